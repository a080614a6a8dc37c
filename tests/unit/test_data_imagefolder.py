"""The imagefolder source: both layouts, labels CSV rules, the decode cache, unusable files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from semiprune_core.data import UNLABELED, folder, load_imagefolder
from semiprune_core.errors import DataError


def write_png(path: Path, *, seed: int = 0, size=(12, 10), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def class_tree(root: Path, layout: dict[str, int], *, seed=0) -> Path:
    for i, (name, n) in enumerate(layout.items()):
        for j in range(n):
            write_png(root / name / f"img{j}.png", seed=seed + 100 * i + j)
    return root


def flat_tree(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        write_png(root / name, seed=i)
    return root


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = folder.decode_image

    def counting(path, **kw):
        calls.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(folder, "decode_image", counting)
    return calls


def load(root, tmp_path, **kw):
    kw.setdefault("image_size", 8)
    return load_imagefolder(root, cache_dir=tmp_path / "cache", **kw)


# ---------------------------------------------------------------------------------------- layouts


def test_class_folders_with_test_root(tmp_path):
    root = class_tree(tmp_path / "train", {"dog": 3, "cat": 2, "emu": 1})
    test = class_tree(tmp_path / "test", {"cat": 1, "dog": 1, "bird": 1}, seed=50)
    pool = load(root, tmp_path, test_root=test, channels=3)
    assert pool.classes == ["bird", "cat", "dog", "emu"]
    assert pool.images.shape == (9, 3, 8, 8) and pool.images.dtype == np.uint8
    assert pool.sample_ids[:6].tolist() == ["cat/img0.png", "cat/img1.png", "dog/img0.png", "dog/img1.png",
                                            "dog/img2.png", "emu/img0.png"]
    assert pool.sample_ids[6:].tolist() == ["test/bird/img0.png", "test/cat/img0.png", "test/dog/img0.png"]
    assert pool.paths[6] == "bird/img0.png"  # relative to test_root
    assert pool.labels.tolist() == [1, 1, 2, 2, 2, 3, 0, 1, 2]
    assert pool.split.tolist() == ["train"] * 6 + ["test"] * 3
    assert pool.true_labels is None and pool.info["has_test"] is True and pool.info["excluded"] == []


def test_flat_folder_with_partial_labels_csv(tmp_path):
    root = flat_tree(tmp_path / "pool", ["a.png", "deep/er/b.JPG", "deep/c.bmp", "d.gif"])
    (root / "deep" / "notes.txt").write_text("not an image")
    csv = write_csv(tmp_path / "labels.csv", "sample_id,label\n./deep/er/b.JPG, zebra\ndeep/c.bmp,ant\n\n")
    pool = load(root, tmp_path, labels_csv=csv, channels=1)
    assert pool.sample_ids.tolist() == ["a.png", "d.gif", "deep/c.bmp", "deep/er/b.JPG"]
    assert pool.paths.tolist() == pool.sample_ids.tolist()
    assert pool.classes == ["ant", "zebra"]
    assert pool.labels.tolist() == [UNLABELED, UNLABELED, 0, 1]
    assert pool.images.shape == (4, 1, 8, 8)
    assert pool.info["has_test"] is False and (pool.split == "train").all()
    assert pool.info["layout"] == "labels-csv" and len(pool.info["labels_csv"]["sha256"]) == 64


def test_resize_is_direct_to_a_square_and_matches_pil(tmp_path):
    path = write_png(tmp_path / "r" / "c" / "wide.png", size=(40, 10), seed=3)
    pool = load(tmp_path / "r", tmp_path, image_size=16, channels=3)
    expected = np.asarray(Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(pool.images[0], expected.transpose(2, 0, 1))


def test_loose_images_without_csv_are_an_error(tmp_path):
    root = class_tree(tmp_path / "r", {"a": 1})
    write_png(root / "loose.png")
    with pytest.raises(DataError, match="outside class folders .*loose.png.*labels_csv"):
        load(root, tmp_path)


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope", tmp_path)


# ---------------------------------------------------------------------------------------- decode cache


def test_decode_cache_reused_and_refreshed(tmp_path, count_decodes):
    root = class_tree(tmp_path / "r", {"a": 2, "b": 2})
    first = load(root, tmp_path)
    assert len(count_decodes) == 4
    cache_files = list((tmp_path / "cache").iterdir())
    assert len(cache_files) == 1 and cache_files[0].suffix == ".parquet"

    count_decodes.clear()
    second = load(root, tmp_path)
    assert count_decodes == []
    np.testing.assert_array_equal(first.images, second.images)

    write_png(root / "a" / "img0.png", seed=99)  # changed content (new size / mtime)
    st = (root / "a" / "img0.png").stat()
    os.utime(root / "a" / "img0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    write_png(root / "b" / "new.png", seed=7)
    (root / "b" / "img1.png").unlink()
    count_decodes.clear()
    third = load(root, tmp_path)
    assert sorted(count_decodes) == ["img0.png", "new.png"]
    assert third.sample_ids.tolist() == ["a/img0.png", "a/img1.png", "b/img0.png", "b/new.png"]
    assert not np.array_equal(third.images[0], first.images[0])
    np.testing.assert_array_equal(third.images[1], first.images[1])

    count_decodes.clear()
    fresh = load_imagefolder(root, image_size=8, cache_dir=tmp_path / "other-cache")
    np.testing.assert_array_equal(fresh.images, third.images)
    assert len(count_decodes) == 4


def test_cache_is_per_size_and_channels(tmp_path, count_decodes):
    root = class_tree(tmp_path / "r", {"a": 2})
    load(root, tmp_path, image_size=8)
    load(root, tmp_path, image_size=16)
    load(root, tmp_path, image_size=8, channels=1)
    assert len(count_decodes) == 6 and len(list((tmp_path / "cache").iterdir())) == 3


def test_damaged_cache_is_ignored(tmp_path, count_decodes, caplog):
    root = class_tree(tmp_path / "r", {"a": 2})
    load(root, tmp_path)
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_bytes(b"garbage")
    count_decodes.clear()
    with caplog.at_level(logging.WARNING):
        assert len(load(root, tmp_path)) == 2
    assert len(count_decodes) == 2 and "ignoring decode cache" in caplog.text


# ---------------------------------------------------------------------------------------- unusable files


def test_corrupt_and_truncated_images_are_excluded_and_counted(tmp_path, caplog, count_decodes):
    root = class_tree(tmp_path / "r", {"a": 3, "b": 2})
    (root / "a" / "bad.png").write_bytes(b"not an image at all")
    good = (root / "b" / "img0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        pool = load(root, tmp_path)
    assert len(pool) == 5 and "a/bad.png" not in pool.sample_ids
    assert [e["path"] for e in pool.info["excluded"]] == ["a/bad.png", "b/cut.png"]
    assert "excluded 2 file(s)" in caplog.text and "a/bad.png" in caplog.text
    count_decodes.clear()
    again = load(root, tmp_path)  # failures are cached too
    assert count_decodes == [] and len(again.info["excluded"]) == 2


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    root = class_tree(tmp_path / "r", {"a": 1})
    write_png(root / "a" / "huge.png", size=(30, 30))
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loads.append(self.size), real_load(self))[1])
    pool = load(root, tmp_path, max_image_pixels=500)
    assert pool.sample_ids.tolist() == ["a/img0.png"]
    (entry,) = pool.info["excluded"]
    assert entry["path"] == "a/huge.png" and "900 pixels, over data.max_image_pixels=500" in entry["reason"]
    assert (30, 30) not in loads
    # raising the limit later decodes it (the cache remembers only its size)
    assert len(load(root, tmp_path, max_image_pixels=10_000)) == 2


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "r" / "a").mkdir(parents=True)
    (tmp_path / "r" / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"no usable images .*1 file\(s\) excluded"):
        load(tmp_path / "r", tmp_path)


def test_symlink_outside_root_is_skipped_inside_is_followed(tmp_path, caplog):
    root = class_tree(tmp_path / "r", {"a": 1})
    outside = write_png(tmp_path / "elsewhere" / "secret.png")
    (root / "a" / "link.png").symlink_to(outside)
    (root / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "a" / "alias.png").symlink_to(root / "a" / "img0.png")
    with caplog.at_level(logging.WARNING):
        pool = load(root, tmp_path)
    assert pool.sample_ids.tolist() == ["a/alias.png", "a/img0.png"]
    assert {e["path"]: e["reason"] for e in pool.info["excluded"]} == {
        "a/link.png": "symlink leads outside the root", "b": "symlink leads outside the root"}
    assert "symlink leads outside the root" in caplog.text


def test_symlink_loop_inside_root_is_read_once(tmp_path):
    root = class_tree(tmp_path / "r", {"a": 1})
    (root / "a" / "again").symlink_to(root / "a", target_is_directory=True)
    (root / "b").symlink_to(root / "a", target_is_directory=True)
    assert load(root, tmp_path).sample_ids.tolist() == ["a/img0.png"]


def test_non_utf8_names_are_skipped_and_recorded(tmp_path):
    root = class_tree(tmp_path / "r", {"a": 1})
    bad = os.path.join(os.fsencode(root / "a"), b"caf\xe9.png")
    try:
        with open(bad, "wb") as fh:
            fh.write((root / "a" / "img0.png").read_bytes())
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    pool = load(root, tmp_path)
    assert pool.sample_ids.tolist() == ["a/img0.png"]
    assert pool.info["excluded"] == [{"path": "a/caf\\xe9.png", "reason": "name is not valid UTF-8"}]


def test_hidden_files_and_other_extensions_are_ignored(tmp_path):
    root = class_tree(tmp_path / "r", {"a": 1})
    write_png(root / "a" / ".thumb.png")
    (root / "a" / "readme.md").write_text("x")
    write_png(root / ".git" / "x.png")
    assert load(root, tmp_path).sample_ids.tolist() == ["a/img0.png"]


# ---------------------------------------------------------------------------------------- labels CSV


@pytest.mark.parametrize("body,pattern", [
    ("sample_id,label\na.png,x\nmissing.png,y\n", r"line 3: 'missing.png' is not an image file under"),
    ("sample_id,label\na.png,x\nb.png,  \n", r"line 3: empty label for 'b.png'"),
    ("sample_id,label\n../r/a.png,x\n", r"line 2: sample_id '../r/a.png' uses '\.\.'"),
    ("sample_id,label\nsub/../a.png,x\n", r"line 2: sample_id 'sub/../a.png' uses '\.\.'"),
    ("sample_id,label\n/etc/passwd,x\n", r"line 2: sample_id '/etc/passwd' is an absolute path"),
    ("sample_id,label\nC:\\a.png,x\n", r"line 2: sample_id 'C:\\\\a.png' is an absolute path"),
    ("sample_id,label\na.png,x\n\nb.png,y\n./a.png,z\n", r"line 5: sample_id 'a.png' is listed twice \(also on line 2\)"),
    ("a.png,x\nb.png,y\n", r"line 1: header is 'a.png,x', expected 'sample_id,label'"),
    ("", r"line 1: header is '', expected 'sample_id,label'"),
    ("sample_id,label\na.png,x,extra\n", r"line 2: 3 fields, expected 2"),
    ("sample_id,label\nnotes.txt,x\n", r"line 2: 'notes.txt' is not an image file"),
])
def test_labels_csv_errors_name_the_line_and_write_nothing(tmp_path, body, pattern):
    root = flat_tree(tmp_path / "r", ["a.png", "b.png"])
    (root / "notes.txt").write_text("x")
    csv = write_csv(tmp_path / "labels.csv", body)
    with pytest.raises(DataError, match=pattern) as err:
        load(root, tmp_path, labels_csv=csv)
    assert str(csv) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_labels_csv_missing_file(tmp_path):
    root = flat_tree(tmp_path / "r", ["a.png"])
    with pytest.raises(DataError, match="labels CSV .*nope.csv not found"):
        load(root, tmp_path, labels_csv=tmp_path / "nope.csv")


def test_labels_csv_with_bom_and_quoted_names(tmp_path):
    root = flat_tree(tmp_path / "r", ["x, y.png", "b.png"])
    csv = tmp_path / "labels.csv"
    csv.write_bytes('\ufeffsample_id,label\n"x, y.png","big, cat"\n'.encode("utf-8"))
    pool = load(root, tmp_path, labels_csv=csv)
    assert pool.classes == ["big, cat"] and pool.labels.tolist() == [UNLABELED, 0]


def test_csv_class_missing_from_test_root_is_warned(tmp_path, caplog):
    root = flat_tree(tmp_path / "r", ["a.png", "b.png"])
    test = class_tree(tmp_path / "t", {"cat": 1})
    csv = write_csv(tmp_path / "labels.csv", "sample_id,label\na.png,cat\nb.png,cta\n")
    with caplog.at_level(logging.WARNING):
        pool = load(root, tmp_path, labels_csv=csv, test_root=test)
    assert pool.classes == ["cat", "cta"] and "cta" in caplog.text
