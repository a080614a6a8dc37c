"""Helpers the sources share."""

from __future__ import annotations


import numpy as np
import pyarrow as pa

from .pool import UNLABELED, Pool


def index_ids(split: str, n: int) -> np.ndarray:
    """``split/000000`` ... zero-padded to at least 6 digits so that ids sort in row order. (n,) str"""
    width = max(6, len(str(max(n - 1, 0))))
    return np.array([f"{split}/{i:0{width}d}" for i in range(n)], dtype=str)


def benchmark_pool(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                   classes: list[str], info: dict, hidden: dict | None = None) -> Pool:
    """A benchmark pool: train rows unlabeled, test rows labeled, every row with its true label.

    train_x (N, C, H, W) uint8, train_y (N,) int; test_x (M, C, H, W) uint8, test_y (M,) int.
    """
    true = np.concatenate([train_y, test_y]).astype(np.int64)
    return Pool(
        sample_ids=np.concatenate([index_ids("train", len(train_y)), index_ids("test", len(test_y))]),
        split=np.array(["train"] * len(train_y) + ["test"] * len(test_y), dtype=str),
        images=np.concatenate([train_x, test_x]),
        labels=np.concatenate([np.full(len(train_y), UNLABELED, np.int64), test_y.astype(np.int64)]),
        classes=list(classes),
        true_labels=true,
        hidden=dict(hidden or {}),
        info={**info, "has_test": True},
    )


def to_fixed_binary(flat: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, K) uint8 rows -> an Arrow ``fixed_size_binary(K)`` array over the same bytes."""
    n, width = flat.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(flat))])


def from_fixed_binary(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_binary(K)`` array -> (N, K) uint8, a read-only view on Arrow's memory (null rows
    hold whatever bytes their slot has)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    width = array.type.byte_width
    data = np.frombuffer(array.buffers()[1], np.uint8, count=(array.offset + len(array)) * width)
    rows = data.reshape(-1, width)[array.offset:]
    rows.flags.writeable = False
    return rows
