"""The stat fingerprint that decides whether prepare must re-read the raw data."""

from __future__ import annotations

import os

from semiprune_core.config import Data
from semiprune_core.data.sources import source_paths, stat_fingerprint


def test_fingerprint_changes_when_a_file_is_added_replaced_or_removed_and_not_otherwise(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"a")
    first = stat_fingerprint([tmp_path])
    assert stat_fingerprint([tmp_path]) == first
    (tmp_path / "cat" / "b.png").write_bytes(b"bb")
    added = stat_fingerprint([tmp_path])
    assert set(added) - set(first) == {str(tmp_path / "cat" / "b.png")}
    os.utime(tmp_path / "cat" / "a.png", ns=(1, 1))
    assert stat_fingerprint([tmp_path]) != added
    (tmp_path / "cat" / "b.png").unlink()
    assert set(stat_fingerprint([tmp_path])) == set(first)


def test_a_missing_place_is_recorded_so_its_appearance_is_noticed(tmp_path):
    assert stat_fingerprint([tmp_path / "nope"]) == {str(tmp_path / "nope"): ["missing"]}


def test_source_paths_name_every_place_the_loader_searches():
    fm = source_paths(Data.model_validate({"source": "fashion-mnist", "root": "data/fm"}))
    assert [str(p) for p in fm] == ["data/fm", "data/fm/FashionMNIST/raw", "/usr/share/datasets/fashion-mnist"]
    folder = source_paths(Data.model_validate({"source": "imagefolder", "root": "imgs", "labels_csv": "l.csv"}))
    assert [str(p) for p in folder] == ["imgs", "l.csv"]
    assert source_paths(Data.model_validate({"source": "synthetic"})) == []
