"""CIFAR-10 / CIFAR-100 from tiny fake python-batch folders, and refusing malicious pickles."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from semiprune_core.data import UNLABELED, load_cifar, sources
from semiprune_core.data.safe_pickle import load_pickle
from semiprune_core.errors import DataError


def _batch(n: int, n_classes: int, label_key: str, *, seed: int, as_bytes: bool) -> dict:
    g = np.random.default_rng(seed)
    batch = {"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [i % n_classes for i in range(n)],
             "batch_label": "fake"}
    return {k.encode(): v for k, v in batch.items()} if as_bytes else batch


def write_cifar10(root: Path, *, n_per_batch=4, as_bytes=True, protocol=2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump(_batch(n_per_batch, 10, "labels", seed=i, as_bytes=as_bytes), fh, protocol=protocol)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(_batch(3, 10, "labels", seed=9, as_bytes=as_bytes), fh, protocol=protocol)
    names = [f"class{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch}, fh, protocol=protocol)
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", 200, 1), ("test", 100, 2)):
        batch = _batch(n, 100, "fine_labels", seed=seed, as_bytes=False)
        batch["coarse_labels"] = [i % 20 for i in range(n)]
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"f{i:02d}" for i in range(100)], "coarse_label_names": ["c"] * 20}, fh)
    return folder


@pytest.mark.parametrize("as_bytes,protocol", [(True, 2), (False, 5)])
def test_cifar10_fake_folder(tmp_path, as_bytes, protocol):
    folder = write_cifar10(tmp_path, as_bytes=as_bytes, protocol=protocol)
    pool = load_cifar("cifar10", root=tmp_path, download=False)
    assert pool.images.shape == (23, 3, 32, 32) and pool.images.dtype == np.uint8
    assert pool.classes == [f"class{i}" for i in range(10)]
    assert (pool.split == "train").sum() == 20 and pool.sample_ids[20] == "test/000000"
    assert (pool.labels[:20] == UNLABELED).all() and pool.labels[20:].tolist() == [0, 1, 2]
    # row order is data_batch_1..5 then test_batch; (N, 3072) is channel-major
    first = pickle.loads((folder / "data_batch_2").read_bytes())
    data = first[b"data" if as_bytes else "data"]
    np.testing.assert_array_equal(pool.images[4], data[0].reshape(3, 32, 32))
    assert set(pool.info["files"]) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"}


def test_cifar_root_may_be_the_batch_folder_itself(tmp_path):
    folder = write_cifar10(tmp_path)
    assert len(load_cifar("cifar10", root=folder, download=False)) == 23


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    pool = load_cifar("cifar100", root=tmp_path, download=False)
    assert len(pool.classes) == 100 and pool.classes[99] == "f99"
    assert pool.true_labels.max() == 99 and len(pool) == 300


def test_cifar_missing_files_named(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_cifar("cifar10", root=tmp_path, download=False)


def test_cifar_failed_download_is_folded_into_the_message(tmp_path, monkeypatch):
    class Offline:
        class datasets:
            class CIFAR10:
                def __init__(self, root, train, download):
                    raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(sources, "import_torchvision", lambda: Offline)
    with pytest.raises(DataError, match=r"missing data_batch_1.*torchvision download into .*Name or service not known"):
        load_cifar("cifar10", root=tmp_path / "c", download=True)
    assert not (tmp_path / "c").exists()


def test_cifar_label_count_mismatch(tmp_path):
    folder = write_cifar10(tmp_path, as_bytes=False, protocol=5)
    batch = pickle.loads((folder / "test_batch").read_bytes())
    batch["labels"] = batch["labels"][:-1]
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="test_batch has 2 labels but 3 images"):
        load_cifar("cifar10", root=tmp_path, download=False)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (builtins.eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, payload):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil(marker) if payload == "system" else _EvalEvil()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"asks for (posix\.system|(__builtin__|builtins)\.eval); refused") as err:
        load_cifar("cifar10", root=tmp_path, download=False)
    assert "data_batch_1" in str(err.value)
    assert not marker.exists()


def test_damaged_pickle_is_a_data_error(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3), np.uint8)})[:-20])
    with pytest.raises(DataError, match="not a readable dataset pickle"):
        load_pickle(path)
