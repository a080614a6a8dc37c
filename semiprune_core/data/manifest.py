"""The prepare stage's pure core: build the pool, then write manifest, images and hidden labels.

Files (all keyed and sorted by ``sample_id``, written atomically by :func:`semiprune_core.io.write_table`):

- ``manifest.parquet``: what every later stage reads: split, human label, is_labeled, content hash,
  path, visible flags; ``class_names`` and ``pool_info`` (how the pool was made) in the metadata.
- ``images.parquet``: the images as fixed-size binary rows; :func:`read_images` maps them back to a
  (N, C, H, W) uint8 array without a copy per row.
- ``hidden_labels.parquet``: benchmark truth (true labels, mislabeled / ambiguous flags), kept apart so
  no stage reads it by accident. Zero rows for real pools.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import Data
from ..errors import DataError
from ..io import column_array, read_table, write_table
from ._common import from_fixed_binary, to_fixed_binary
from .labeled import choose_labeled
from .pool import UNLABELED, Pool
from .sources import load_source
from .variants import corrupt, long_tail, subsample

MANIFEST = "manifest.parquet"
IMAGES = "images.parquet"
HIDDEN = "hidden_labels.parquet"
_SHAPE_KEY = b"semiprune.image_shape"
MANIFEST_COLUMNS = ["sample_id", "split", "label", "is_labeled", "content_hash", "path", "is_corrupted", "corruption"]


def build_pool(cfg: Data, *, seed: int, cache_dir: Path) -> Pool:
    """load_source -> subsample -> long_tail -> corrupt -> labeled subset.

    The result has ``flags["is_labeled"]`` (N,) bool (test rows False) and ``labels`` = the human
    labels the pipeline may see: the labeled train rows and the test rows; UNLABELED elsewhere.
    """
    pool = load_source(cfg, seed=seed, cache_dir=cache_dir)
    check_unique_ids(pool.sample_ids)
    if cfg.subsample.train is not None or cfg.subsample.test is not None:
        pool = subsample(pool, n_train=cfg.subsample.train, n_test=cfg.subsample.test, seed=seed)
    pool = long_tail(pool, imbalance=cfg.long_tail.imbalance, seed=seed)
    pool = corrupt(pool, share=cfg.corrupt.share, kinds=cfg.corrupt.kinds, severity=cfg.corrupt.severity, seed=seed)

    train = pool.split == "train"
    if not train.any():
        raise DataError(f"the {pool.info.get('source', 'dataset')} pool has no train samples",
                        "check data.root and the dataset files")
    if len(pool.classes) < 2:
        raise DataError(f"the pool has {len(pool.classes)} class(es) ({', '.join(pool.classes) or 'none'}); "
                        "pruning needs at least 2 classes", "add samples of another class")
    ref = pool.reference_labels()
    opts = cfg.labeled
    is_labeled = np.zeros(len(pool), bool)
    is_labeled[train] = choose_labeled(ref[train], per_class=opts.per_class, fraction=opts.fraction,
                                       count=opts.count, seed=seed, classes=pool.classes)
    labels = np.where(is_labeled | ~train, ref, UNLABELED).astype(np.int64)
    return replace(pool, labels=labels, flags={**pool.flags, "is_labeled": is_labeled})


def check_unique_ids(sample_ids: np.ndarray) -> None:
    """Every sample_id once, or a DataError naming one that repeats."""
    values, counts = np.unique(sample_ids, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise DataError(f"sample_id {str(dup[0])!r} occurs {counts[counts > 1][0]} times ({len(dup)} duplicated id(s))",
                        "give every file a distinct path (a train folder named 'test/' clashes with test ids)")


def content_hashes(images: np.ndarray) -> list[str]:
    """blake2b-64 hex digest of each image's bytes. (N, C, H, W) uint8 -> N strings."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    raw = memoryview(flat.tobytes()) if flat.size else memoryview(b"")
    step = flat.shape[1] if flat.ndim == 2 else 0
    return [hashlib.blake2b(raw[i * step:(i + 1) * step], digest_size=8).hexdigest() for i in range(len(flat))]


def _flag_array(values: np.ndarray) -> pa.Array:
    values = np.asarray(values)
    return pa.array(values.astype(str) if values.dtype.kind in "OU" else values)


def manifest_table(pool: Pool) -> pa.Table:
    """One row per sample: sample_id, split, label (int16, null = none), is_labeled, content_hash, path
    (null unless a folder source), then the visible flags (``is_corrupted`` / ``corruption`` always present).
    """
    n = len(pool)
    is_labeled = pool.flags.get("is_labeled")
    if is_labeled is None:
        is_labeled = (pool.labels >= 0) & (pool.split == "train")
    columns = {
        "sample_id": pa.array(pool.sample_ids.astype(str), pa.string()),
        "split": pa.array(pool.split.astype(str), pa.string()),
        "label": pa.array(pool.labels, pa.int16(), mask=pool.labels < 0),
        "is_labeled": pa.array(np.asarray(is_labeled, bool)),
        "content_hash": pa.array(content_hashes(pool.images), pa.string()),
        "path": pa.array(pool.paths.astype(str), pa.string()) if pool.paths is not None else pa.nulls(n, pa.string()),
        "is_corrupted": pa.array(np.asarray(pool.flags.get("is_corrupted", np.zeros(n, bool)), bool)),
        "corruption": pa.array(np.asarray(pool.flags.get("corruption", np.full(n, "")), str), pa.string()),
    }
    for name in sorted(set(pool.flags) - set(columns)):
        columns[name] = _flag_array(pool.flags[name])
    return pa.table(columns)


def images_table(pool: Pool) -> pa.Table:
    """sample_id + image as ``fixed_size_binary(C*H*W)``; the (C, H, W) shape is in the schema metadata."""
    n, *shape = pool.images.shape
    image = to_fixed_binary(pool.images.reshape(n, int(np.prod(shape))))
    table = pa.table({"sample_id": pa.array(pool.sample_ids.astype(str), pa.string()), "image": image})
    return table.replace_schema_metadata({_SHAPE_KEY: json.dumps(shape).encode()})


def read_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """images.parquet -> (sample_ids (N,) str object array, images (N, C, H, W) uint8, read-only view).

    The images are a view on the Arrow buffer (no copy per row); ``.copy()`` them to modify.
    """
    table = read_table(path, stage="prepare")
    raw_shape = (table.schema.metadata or {}).get(_SHAPE_KEY)
    if raw_shape is None or "image" not in table.column_names:
        raise DataError(f"{path} is not a semiprune images table (no image shape)", "re-run the prepare stage")
    images = from_fixed_binary(table["image"]).reshape(-1, *json.loads(raw_shape))
    return column_array(table["sample_id"]), images


def hidden_table(pool: Pool) -> pa.Table:
    """sample_id, true_label (int16) and the hidden extras; zero rows (same two columns) for real pools."""
    if pool.true_labels is None:
        return pa.table({"sample_id": pa.array([], pa.string()), "true_label": pa.array([], pa.int16())})
    columns = {
        "sample_id": pa.array(pool.sample_ids.astype(str), pa.string()),
        "true_label": pa.array(pool.true_labels, pa.int16()),
    }
    for name in sorted(pool.hidden):
        values = np.asarray(pool.hidden[name])
        columns[name] = pa.array(values, pa.int16()) if values.dtype.kind in "iu" else _flag_array(values)
    return pa.table(columns)


def read_hidden_labels(path: str | os.PathLike) -> pa.Table:
    """The hidden benchmark truth. FOR REPORTS AND BENCHMARK EVALUATION ONLY: no pipeline stage
    (training, pseudo-labelling, scoring, selection) may read it, or the benchmark leaks its answers.
    """
    return read_table(path, stage="prepare")


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """The manifest table; a DataError if it is missing, unreadable or lacks a required column."""
    table = read_table(path, stage="prepare")
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path} is not a semiprune manifest (missing column {missing[0]!r})", "re-run the prepare stage")
    return table


def _per_class(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    counts = Counter(int(v) for v in labels)
    out = {name: counts.get(i, 0) for i, name in enumerate(classes)}
    if counts.get(UNLABELED):
        out["(unlabeled)"] = counts[UNLABELED]
    return out


def prepare_metrics(pool: Pool) -> dict:
    """Counts a person checks after prepare: rows per split, per class, labeled per class, exclusions."""
    train, test = pool.split == "train", pool.split == "test"
    ref = pool.reference_labels()
    is_labeled = pool.flags.get("is_labeled", np.zeros(len(pool), bool))
    return {
        "source": pool.info.get("source"),
        "n": {"train": int(train.sum()), "test": int(test.sum())},
        "n_labeled": int(is_labeled.sum()),
        "per_class": {"train": _per_class(ref[train], pool.classes), "test": _per_class(ref[test], pool.classes)},
        "labeled_per_class": _per_class(pool.labels[is_labeled], pool.classes),
        "excluded_images": len(pool.info.get("excluded", [])),
        "variants": [v["name"] for v in pool.info.get("variants", [])],
        "has_test": bool(pool.info.get("has_test", test.any())),
    }


def write_prepare_outputs(pool: Pool, out_dir: Path, *, meta: dict) -> dict:
    """Write manifest, images and hidden labels into ``out_dir``; return :func:`prepare_metrics`.

    Deterministic: the same pool and meta give byte-identical files.
    """
    out_dir = Path(out_dir)
    tables = {MANIFEST: manifest_table(pool), IMAGES: images_table(pool), HIDDEN: hidden_table(pool)}
    extra = {MANIFEST: {"class_names": pool.classes, "pool_info": pool.info}, IMAGES: {"image_shape": list(pool.images.shape[1:])}}
    for name, table in tables.items():
        write_table(out_dir / name, table, meta={**meta, **extra.get(name, {})})
    return prepare_metrics(pool)
