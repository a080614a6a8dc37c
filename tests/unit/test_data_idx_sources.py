"""IDX parsing and the Fashion-MNIST / MNIST sources."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semiprune_core.data import FASHION_MNIST_CLASSES, UNLABELED, load_idx_source, parse_idx, sources
from semiprune_core.data._common import index_ids
from semiprune_core.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = sources.IDX_FILES


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(folder: Path, *, n_train=12, n_test=5, size=4, gz=True, seed=0, overrides=None) -> Path:
    """Tiny IDX files in ``folder``; ``overrides`` maps a key of IDX_FILES to raw file bytes."""
    g = np.random.default_rng(seed)
    arrays = {
        "train_images": g.integers(0, 256, (n_train, size, size)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": g.integers(0, 256, (n_test, size, size)),
        "test_labels": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        raw = (overrides or {}).get(key, idx_bytes(arr))
        name = NAMES[key] + (".gz" if gz else "")
        (folder / name).write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return folder


# ---------------------------------------------------------------------------------------- parse_idx


def test_parse_idx_round_trip():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr)), arr)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_parse_idx_random_bytes_raise_data_error_or_parse(raw):
    try:
        out = parse_idx(raw)
    except DataError:
        return
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from([0x08, 0x08, 0x09, 0x0D]),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=5),
    extra=st.integers(-8, 8),
)
def test_parse_idx_near_valid_headers(dtype, shape, extra):
    """Well-formed magic with random dims and a body that is a little short or long."""
    count = int(np.prod(shape, dtype=np.int64))
    body_len = max(0, count + extra)
    raw = struct.pack(">HBB", 0, dtype, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + bytes(body_len)
    try:
        out = parse_idx(raw)
    except DataError as err:
        assert "\n" not in str(err)
        return
    assert out.shape == tuple(shape) and body_len == count and dtype == 0x08 and 1 <= len(shape) <= 4


# ---------------------------------------------------------------------------------------- sources


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_real_fashion_mnist_from_system_package(tmp_path):
    pool = load_idx_source("fashion-mnist", root=tmp_path / "absent", download=False)
    assert len(pool) == 70_000
    assert (pool.split == "train").sum() == 60_000 and (pool.split == "test").sum() == 10_000
    assert pool.images.shape == (70_000, 1, 28, 28) and pool.images.dtype == np.uint8
    assert len(np.unique(pool.sample_ids)) == 70_000
    assert pool.sample_ids[0] == "train/000000" and pool.sample_ids[-1] == "test/009999"
    assert pool.classes == FASHION_MNIST_CLASSES
    assert np.bincount(pool.true_labels, minlength=10).tolist() == [7000] * 10
    train = pool.split == "train"
    assert (pool.labels[train] == UNLABELED).all()
    np.testing.assert_array_equal(pool.labels[~train], pool.true_labels[~train])
    assert pool.info["folder"] == str(FASHION_DIR)
    assert set(pool.info["files"]) == {n + ".gz" for n in NAMES.values()}


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_root(tmp_path, gz):
    root = write_mnist(tmp_path / "mnist", gz=gz)
    pool = load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")
    assert pool.images.shape == (17, 1, 4, 4)
    assert pool.classes == [str(d) for d in range(10)]
    assert list(pool.sample_ids[:2]) == ["train/000000", "train/000001"] and pool.sample_ids[12] == "test/000000"
    np.testing.assert_array_equal(pool.true_labels, np.r_[np.arange(12) % 10, np.arange(5) % 10])
    assert pool.info["source"] == "mnist" and pool.info["folder"] == str(root)
    assert all(len(h) == 64 for h in pool.info["files"].values())


def test_files_from_an_earlier_torchvision_download_are_found(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    pool = load_idx_source("mnist", root=tmp_path, download=False, system_dir=tmp_path / "nowhere")
    assert len(pool) == 17 and pool.info["folder"] == str(tmp_path / "MNIST" / "raw")


def test_ids_widen_beyond_six_digits():
    ids = index_ids("train", 1_000_001)
    assert ids[-1] == "train/1000000" and ids[0] == "train/0000000"
    assert list(ids) == sorted(ids)


def test_missing_files_give_one_message_naming_all_three_places(tmp_path, monkeypatch):
    calls = []

    class FailingDataset:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            Path(root, "MNIST", "raw").mkdir(parents=True, exist_ok=True)  # like torchvision
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error Name or service not known>")

    class FakeTorchvision:
        class datasets:
            MNIST = FailingDataset

    monkeypatch.setattr(sources, "import_torchvision", lambda: FakeTorchvision)
    root = tmp_path / "data"
    system = tmp_path / "usr-share"
    with pytest.raises(DataError) as err:
        load_idx_source("mnist", root=root, download=True, system_dir=system)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(root) in msg and str(system) in msg and "torchvision download" in msg
    assert "Name or service not known" in msg and "put the four IDX files" in msg
    assert calls == [(str(root), True, True)]
    assert not root.exists(), "the failed download must not leave empty folders behind"


def test_missing_fashion_mnist_suggests_the_debian_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_idx_source("fashion-mnist", root=tmp_path, download=False, system_dir=tmp_path / "nowhere")
    assert "download is false" in str(err.value)


def test_partial_folder_names_the_missing_file(tmp_path):
    root = write_mnist(tmp_path / "m")
    (root / (NAMES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")


def test_real_download_offline_fails_quickly_and_is_folded(tmp_path):
    """No internet here: torchvision's real download must fail into the one message."""
    with pytest.raises(DataError, match="torchvision download into"):
        load_idx_source("mnist", root=tmp_path / "dl", download=True, system_dir=tmp_path / "nowhere")
    assert not (tmp_path / "dl").exists()


def test_truncated_idx_is_named(tmp_path):
    good = idx_bytes(np.zeros((12, 4, 4)))
    root = write_mnist(tmp_path / "m", overrides={"train_images": good[:-10]})
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is truncated"):
        load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")


def test_damaged_gzip_is_named(tmp_path):
    root = write_mnist(tmp_path / "m")
    path = root / (NAMES["train_labels"] + ".gz")
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match="damaged gzip"):
        load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")


def test_label_count_must_match_image_count(tmp_path):
    root = write_mnist(tmp_path / "m", overrides={"train_labels": idx_bytes(np.zeros(11))})
    with pytest.raises(DataError, match="has 11 labels but .* has 12 images"):
        load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")


def test_label_values_must_be_below_ten(tmp_path):
    root = write_mnist(tmp_path / "m", overrides={"test_labels": idx_bytes(np.array([0, 1, 2, 3, 10]))})
    with pytest.raises(DataError, match="holds label 10"):
        load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")


def test_images_must_be_three_dimensional(tmp_path):
    root = write_mnist(tmp_path / "m", overrides={"test_images": idx_bytes(np.zeros((5, 16)))})
    with pytest.raises(DataError, match=r"expected images \(N, H, W\)"):
        load_idx_source("mnist", root=root, download=False, system_dir=tmp_path / "nowhere")
