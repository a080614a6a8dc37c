"""build_pool and the prepare outputs: manifest, images, hidden labels, metrics, byte stability."""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from semiprune_core.config import Data
from semiprune_core.data import (
    UNLABELED,
    build_pool,
    hidden_table,
    manifest_table,
    read_hidden_labels,
    read_images,
    read_manifest,
    write_prepare_outputs,
)
from semiprune_core.errors import DataError
from semiprune_core.io import column_array, read_parquet, read_table, table_meta

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SYNTH = {
    "source": "synthetic",
    "synthetic": {"n_train": 400, "n_test": 100, "n_classes": 4, "image_size": 12},
    "subsample": {"train": 360, "test": 80},
    "long_tail": {"imbalance": 0.5},
    "corrupt": {"share": 0.2, "severity": 2},
    "labeled": {"per_class": 5},
}


def cfg(**over) -> Data:
    return Data.model_validate(over)


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def png(path: Path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def synth_pool(tmp_path_factory):
    return build_pool(cfg(**SYNTH), seed=7, cache_dir=tmp_path_factory.mktemp("cache"))


def test_build_pool_chains_variants_and_labels(synth_pool):
    pool = synth_pool
    train = pool.split == "train"
    assert [v["name"] for v in pool.info["variants"]] == ["subsample", "long_tail", "corrupt"]
    is_labeled = pool.flags["is_labeled"]
    assert not is_labeled[~train].any()
    assert np.bincount(pool.true_labels[is_labeled], minlength=4).tolist() == [5] * 4
    np.testing.assert_array_equal(pool.labels[is_labeled], pool.true_labels[is_labeled])
    assert (pool.labels[train & ~is_labeled] == UNLABELED).all()
    np.testing.assert_array_equal(pool.labels[~train], pool.true_labels[~train])
    assert pool.flags["is_corrupted"].sum() == round(0.2 * train.sum())


def test_outputs_are_byte_identical_across_writes_and_rebuilds(synth_pool, tmp_path):
    meta = {"params": {"data": SYNTH}}
    write_prepare_outputs(synth_pool, tmp_path / "a", meta=meta)
    write_prepare_outputs(synth_pool, tmp_path / "b", meta=meta)
    rebuilt = build_pool(cfg(**SYNTH), seed=7, cache_dir=tmp_path / "cache")
    write_prepare_outputs(rebuilt, tmp_path / "c", meta=meta)
    a = outputs(tmp_path / "a")
    assert set(a) == {"manifest.parquet", "images.parquet", "hidden_labels.parquet"}
    assert a == outputs(tmp_path / "b") == outputs(tmp_path / "c")
    other_seed = build_pool(cfg(**SYNTH), seed=8, cache_dir=tmp_path / "cache")
    write_prepare_outputs(other_seed, tmp_path / "d", meta=meta)
    assert outputs(tmp_path / "d")["manifest.parquet"] != a["manifest.parquet"]


def test_manifest_columns_types_and_metadata(synth_pool, tmp_path):
    metrics = write_prepare_outputs(synth_pool, tmp_path, meta={"params": {"x": 1}})
    table = read_manifest(tmp_path / "manifest.parquet")
    assert table.column_names[:8] == ["sample_id", "split", "label", "is_labeled", "content_hash", "path",
                                      "is_corrupted", "corruption"]
    types = {f.name: f.type for f in table.schema}
    assert types["label"] == pa.int16() and types["is_labeled"] == pa.bool_() and types["path"] == pa.string()
    ids = table["sample_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == len(synth_pool)
    assert table["label"].null_count == int((synth_pool.labels < 0).sum())
    assert table["path"].null_count == len(table)
    assert all(len(h) == 16 for h in table["content_hash"].to_pylist())
    meta = table_meta(tmp_path / "manifest.parquet")
    assert meta["class_names"] == synth_pool.classes and meta["params"] == {"x": 1}
    assert meta["pool_info"]["variants"][0]["name"] == "subsample"
    assert metrics["n"] == {"train": int((synth_pool.split == "train").sum()), "test": 80}
    assert metrics["labeled_per_class"] == {name: 5 for name in synth_pool.classes}
    assert metrics["variants"] == ["subsample", "long_tail", "corrupt"] and metrics["source"] == "synthetic"


def test_content_hash_identifies_equal_images(synth_pool):
    table = manifest_table(synth_pool.take(np.r_[0, 0, 1]))
    h = table["content_hash"].to_pylist()
    assert h[0] == h[1] != h[2]


def test_images_round_trip_as_a_view(synth_pool, tmp_path):
    write_prepare_outputs(synth_pool, tmp_path, meta={})
    ids, images = read_images(tmp_path / "images.parquet")
    order = np.argsort(synth_pool.sample_ids)
    assert ids.tolist() == synth_pool.sample_ids[order].tolist()
    np.testing.assert_array_equal(images, synth_pool.images[order])
    assert images.shape == (len(synth_pool), 1, 12, 12) and not images.flags.writeable


def test_tables_are_read_whole_with_their_metadata_without_pyarrows_dataset_layer(synth_pool, tmp_path):
    write_prepare_outputs(synth_pool, tmp_path, meta={"seed": 3})
    path = tmp_path / "manifest.parquet"
    read = read_table(path)
    assert read.equals(pq.read_table(path)) and read.schema.metadata == pq.read_table(path).schema.metadata
    assert table_meta(read)["seed"] == 3
    assert read_table(path, columns=["sample_id"]).column_names == ["sample_id"]
    assert read_parquet(io.BytesIO(path.read_bytes())).equals(read)  # a file object too (a DVC revision)
    # the dataset layer (and pandas, which it imports) cost every stage process ~0.2 s to load
    probe = "import sys; from semiprune_core.io import read_table; read_table(sys.argv[1]); print('pyarrow.dataset' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_columns_become_the_arrays_pyarrow_gives_without_importing_pandas(synth_pool, tmp_path):
    write_prepare_outputs(synth_pool, tmp_path, meta={})
    table = read_table(tmp_path / "manifest.parquet")
    table = table.append_column("split_codes", table["split"].dictionary_encode())
    for name in table.column_names:
        got, want = column_array(table[name]), table[name].to_numpy(zero_copy_only=False)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # missing labels (NaN) included
    assert column_array(pa.chunked_array([], pa.string())).shape == (0,)
    # pyarrow turns strings into numpy through its pandas layer (slower at scale), importing pandas
    probe = ("import sys; from semiprune_core.data.prepared import load_prepared; from semiprune_core.io import "
             "column_array, read_table; column_array(read_table(sys.argv[1])['sample_id']); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "manifest.parquet")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_hidden_labels_kept_apart(synth_pool, tmp_path):
    write_prepare_outputs(synth_pool, tmp_path, meta={})
    hidden = read_hidden_labels(tmp_path / "hidden_labels.parquet")
    assert {"sample_id", "true_label", "is_mislabeled", "clean_label", "is_ambiguous"} <= set(hidden.column_names)
    manifest = read_manifest(tmp_path / "manifest.parquet")
    assert not {"true_label", "is_mislabeled", "clean_label"} & set(manifest.column_names)
    assert hidden["sample_id"].to_pylist() == manifest["sample_id"].to_pylist()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "manifest.parquet")
    pq.write_table(pa.table({"sample_id": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match="not a semiprune manifest"):
        read_manifest(tmp_path / "other.parquet")


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_real_fashion_mnist_prepare(tmp_path):
    pool = build_pool(cfg(root=str(tmp_path / "absent"), download=False), seed=0, cache_dir=tmp_path / "c")
    write_prepare_outputs(pool, tmp_path / "out", meta={})
    manifest = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert manifest.num_rows == 70_000 and len(set(manifest["sample_id"].to_pylist())) == 70_000
    assert manifest["is_labeled"].to_numpy().sum() == 1000  # default per_class=100
    start = time.perf_counter()
    ids, images = read_images(tmp_path / "out" / "images.parquet")
    elapsed = time.perf_counter() - start
    assert images.shape == (70_000, 1, 28, 28) and ids[0] == "test/000000"
    assert elapsed < 3, f"read_images took {elapsed:.2f}s"  # about 0.3 s here; generous for a shared machine


# ---------------------------------------------------------------------------------------- bad inputs


def _idx(arr) -> bytes:
    arr = np.asarray(arr, np.uint8)
    return gzip.compress(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def test_empty_train_split_is_an_error_and_nothing_is_written(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for name, arr in {"train-images-idx3-ubyte": np.zeros((0, 4, 4)), "train-labels-idx1-ubyte": np.zeros(0),
                      "t10k-images-idx3-ubyte": np.zeros((3, 4, 4)), "t10k-labels-idx1-ubyte": np.arange(3)}.items():
        (root / f"{name}.gz").write_bytes(_idx(arr))
    with pytest.raises(DataError, match="has no train samples"):
        build_pool(cfg(source="mnist", root=str(root), download=False), seed=0, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_single_class_is_an_error(tmp_path):
    for i in range(3):
        png(tmp_path / "r" / "only" / f"{i}.png", seed=i)
    with pytest.raises(DataError, match="needs at least 2 classes"):
        build_pool(cfg(source="imagefolder", root=str(tmp_path / "r"), labeled={"per_class": None}), seed=0,
                   cache_dir=tmp_path / "c")


def test_duplicate_sample_ids_are_an_error(tmp_path):
    png(tmp_path / "r" / "a.png")
    png(tmp_path / "r" / "test" / "cat" / "x.png")
    png(tmp_path / "t" / "cat" / "x.png")
    (tmp_path / "labels.csv").write_text("sample_id,label\na.png,cat\n")
    with pytest.raises(DataError, match=r"sample_id 'test/cat/x.png' occurs 2 times"):
        build_pool(cfg(source="imagefolder", root=str(tmp_path / "r"), test_root=str(tmp_path / "t"),
                       labels_csv=str(tmp_path / "labels.csv"), labeled={"per_class": None}),
                   seed=0, cache_dir=tmp_path / "c")


def test_budget_larger_than_class_via_build_pool(tmp_path):
    with pytest.raises(DataError, match=r"per_class=200 asks for 200 labels of class 'class_0', which has only"):
        build_pool(cfg(**{**SYNTH, "labeled": {"per_class": 200}}), seed=0, cache_dir=tmp_path)


def test_imagefolder_manifest_has_paths_and_empty_hidden_table(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "sub/c.png", "sub/d.png"]):
        png(tmp_path / "r" / name, seed=i)
    (tmp_path / "labels.csv").write_text("sample_id,label\na.png,cat\nsub/c.png,dog\n")
    pool = build_pool(cfg(source="imagefolder", root=str(tmp_path / "r"), labels_csv=str(tmp_path / "labels.csv"),
                          image_size=8, labeled={"per_class": None}), seed=0, cache_dir=tmp_path / "c")
    metrics = write_prepare_outputs(pool, tmp_path / "out", meta={})
    manifest = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert manifest["path"].to_pylist() == ["a.png", "b.png", "sub/c.png", "sub/d.png"]
    assert manifest["label"].to_pylist() == [0, None, 1, None]
    assert manifest["is_labeled"].to_pylist() == [True, False, True, False]
    assert manifest["is_corrupted"].to_pylist() == [False] * 4 and manifest["corruption"].to_pylist() == [""] * 4
    hidden = read_hidden_labels(tmp_path / "out" / "hidden_labels.parquet")
    assert hidden.num_rows == 0 and hidden.column_names == ["sample_id", "true_label"]
    assert hidden.schema.field("true_label").type == hidden_table(pool).schema.field("true_label").type
    assert metrics["has_test"] is False and metrics["excluded_images"] == 0
    assert metrics["per_class"]["train"] == {"cat": 1, "dog": 1, "(unlabeled)": 2}
