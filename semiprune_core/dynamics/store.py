"""The dynamics table: one Parquet file per proxy model, one row per sample, one list entry per epoch.

Format (``artifacts/dynamics/fold_<k>.parquet``), sorted by ``sample_id``:

  sample_id    string
  fold         int8                      the sample's fold
  is_oos       bool                      true for the model's held-out fold (out-of-sample trajectory)
  target_prob  fixed_size_list<float16>[E]    one value per epoch, epoch 0 first
  margin       fixed_size_list<float16>[E]
  loss         fixed_size_list<float16>[E]
  entropy      fixed_size_list<float16>[E]
  el2n         fixed_size_list<float16>[E]
  correct      fixed_size_list<bool>[E]

Parquet stores float16 natively (its FLOAT16 logical type, pyarrow >= 15). The float columns use the
BYTE_STREAM_SPLIT encoding (pyarrow >= 17; older ones fall back to the default) and no dictionary,
then zstd: ~15% smaller than the default encoding and ~3x faster to read. Raw size: 5 x 2 bytes + 1 bit
per sample-epoch (float32 would be 20); on disk about 8 bytes on noisy synthetic dynamics (real, smoother
trajectories compress better). float16 keeps ~3 significant digits (q in [0.5, 1) in steps of
2^-11 ~ 0.0005; finite values beyond +-65504 are clipped to it, NaN stays NaN): ample for scores that
sum or average over epochs. The schema metadata (key ``semiprune``, read with
:func:`semiprune_core.io.table_meta`) holds ``epochs``, ``metrics``, the code version and the caller's
``meta`` (e.g. the held-out fold, the params).

Files are written in row groups of ``chunk_rows`` samples, so writing N = 1M samples x E epochs needs
memory for one chunk, not for the whole table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import __version__
from ..errors import DataError
from ..io import META_KEY, PARQUET_OPTIONS, _json_default, atomic_path, read_parquet, table_meta

#: The per-sample statistics, in the order they are stored (``correct`` as 0/1 in the scratch memmap).
METRICS: tuple[str, ...] = ("target_prob", "margin", "loss", "entropy", "el2n", "correct")
#: The float-valued ones (``correct`` is boolean).
FLOAT_METRICS: tuple[str, ...] = METRICS[:-1]

FLOAT16_MAX = float(np.finfo(np.float16).max)
DEFAULT_CHUNK_ROWS = 65_536
_PYARROW_MAJOR = int(pa.__version__.split(".")[0])


def _writer_options() -> dict[str, Any]:
    opts: dict[str, Any] = dict(PARQUET_OPTIONS)
    if _PYARROW_MAJOR >= 17:  # BYTE_STREAM_SPLIT for FIXED_LEN_BYTE_ARRAY (float16) arrived in Arrow 17
        opts.update(use_dictionary=False, use_byte_stream_split=[f"{m}.list.element" for m in FLOAT_METRICS])
    return opts
STAGE = "score@fold"


def dynamics_schema(epochs: int, meta: Mapping[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema of a dynamics table with ``epochs`` entries per trajectory."""
    fields = [pa.field("sample_id", pa.string(), nullable=False), pa.field("fold", pa.int8(), nullable=False),
              pa.field("is_oos", pa.bool_(), nullable=False)]
    fields += [pa.field(m, pa.list_(pa.float16(), epochs), nullable=False) for m in FLOAT_METRICS]
    fields.append(pa.field("correct", pa.list_(pa.bool_(), epochs), nullable=False))
    info = {"code_version": __version__, **(meta or {}), "epochs": int(epochs), "metrics": list(METRICS)}
    return pa.schema(fields, metadata={META_KEY: json.dumps(info, sort_keys=True, default=_json_default).encode()})


def to_float16(values: np.ndarray) -> np.ndarray:
    """Cast to float16, clipping finite values to +-65504 (NaN stays NaN, so corruption is still caught)."""
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def write_dynamics(
    path: str | os.PathLike,
    sample_ids: np.ndarray,
    *,
    fold: np.ndarray,
    is_oos: np.ndarray,
    values: np.ndarray,
    meta: Mapping[str, Any] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> None:
    """Write a dynamics table atomically, sorted by ``sample_id``, ``chunk_rows`` samples at a time.

    sample_ids  (N,) str, unique
    fold        (N,) int  each sample's fold
    is_oos      (N,) bool true where the trajectory is out-of-sample
    values      (E, N, M) array-like (an ``np.memmap`` is fine: it is read a chunk of samples at a time),
                M = len(METRICS) in :data:`METRICS` order, ``correct`` as 0/1; sample n is row n of the ids
    meta        JSON-able metadata stored in the schema (e.g. ``{"held_out_fold": k, "params": ...}``)
    """
    ids = pa.array(np.asarray(sample_ids, dtype=object), type=pa.string())
    n = len(ids)
    if values.ndim != 3 or values.shape[1] != n or values.shape[2] != len(METRICS):
        raise ValueError(f"values must have shape (E, {n}, {len(METRICS)}), got {tuple(values.shape)}")
    epochs = values.shape[0]
    fold = np.asarray(fold)
    is_oos = np.asarray(is_oos, dtype=bool)
    if fold.shape != (n,) or is_oos.shape != (n,):
        raise ValueError(f"fold and is_oos must have shape ({n},), got {fold.shape} and {is_oos.shape}")
    if ids.null_count:
        raise DataError("a sample_id is missing (null)", "give every sample an id")
    order = pc.sort_indices(ids).to_numpy()
    sorted_ids = ids.take(order)
    if n > 1:
        dup = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, n - 1))
        if pc.any(dup).as_py():
            first = sorted_ids[int(np.flatnonzero(dup.to_numpy(zero_copy_only=False))[0])].as_py()
            raise DataError(f"sample_id {first!r} occurs more than once", "sample ids must be unique")
    schema = dynamics_schema(epochs, meta)
    chunk_rows = max(1, int(chunk_rows))
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, **_writer_options()) as writer:
        for start in range(0, n, chunk_rows):
            rows = order[start : start + chunk_rows]
            block = np.asarray(values[:, np.sort(rows), :])  # sorted rows: sequential reads from a memmap
            block = block[:, np.argsort(np.argsort(rows)), :]  # back to sample_id order
            writer.write_table(_chunk_table(schema, sorted_ids.slice(start, len(rows)), fold[rows], is_oos[rows], block))


def _chunk_table(schema: pa.Schema, ids: pa.Array, fold: np.ndarray, is_oos: np.ndarray, block: np.ndarray) -> pa.Table:
    """block (E, B, M) -> a table of B rows; each metric column is (B, E) flattened row-major."""
    epochs = block.shape[0]
    columns = [ids, pa.array(fold.astype(np.int8)), pa.array(is_oos)]
    for j, name in enumerate(METRICS):
        per_sample = np.ascontiguousarray(block[:, :, j].T)  # (B, E)
        if name == "correct":
            flat = pa.array(per_sample.reshape(-1) > 0.5)
        else:
            flat = pa.array(to_float16(per_sample).reshape(-1), type=pa.float16())
        columns.append(pa.FixedSizeListArray.from_arrays(flat, epochs))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class Dynamics:
    """One dynamics file as aligned numpy arrays (rows sorted by ``sample_id``).

    sample_ids    (N,) object array of str
    fold          (N,) int8
    is_oos        (N,) bool
    trajectories  name -> (N, E): float16 for the float metrics of :data:`FLOAT_METRICS`, bool ``correct``
    meta          the writer's schema metadata (``epochs``, ``held_out_fold``, ...)
    path          where it was read from
    """

    sample_ids: np.ndarray
    fold: np.ndarray
    is_oos: np.ndarray
    trajectories: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def epochs(self) -> int:
        return next(iter(self.trajectories.values())).shape[1] if self.trajectories else int(self.meta.get("epochs", 0))


def read_dynamics(path: str | os.PathLike, *, metrics: tuple[str, ...] = METRICS) -> Dynamics:
    """Read and validate a dynamics file, one column at a time.

    metrics  which trajectories to load (default: all)
    Raises :class:`DataError` (naming the file) when it is missing or unreadable, lacks a column, has a
    trajectory of the wrong type or length, has nulls, is not sorted by ``sample_id``, or holds a NaN or
    infinite value (the message names the first such sample id).
    """
    path = Path(path)
    fix = f"delete it and re-run {STAGE}"
    if not path.exists():
        raise DataError(f"{path} does not exist", f"run {STAGE} first")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path} is not a readable Parquet file ({err})", fix) from None
    missing = [c for c in ("sample_id", "fold", "is_oos", *metrics) if c not in schema.names]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)} of a dynamics table", fix)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")

    def column(name: str) -> pa.ChunkedArray:
        try:
            col = read_parquet(path, columns=[name]).column(0)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read column {name!r} ({err})", fix) from None
        if col.null_count:
            raise DataError(f"{path}: column {name!r} has {col.null_count} missing value(s)", fix)
        return col

    ids_col = column("sample_id")
    sample_ids = ids_col.to_numpy()
    n = len(sample_ids)
    if n > 1 and not pc.all(pc.less(ids_col.slice(0, n - 1), ids_col.slice(1))).as_py():
        raise DataError(f"{path} is not sorted by unique sample_id", fix)
    fold = column("fold").to_numpy().astype(np.int8, copy=False)
    is_oos = column("is_oos").to_numpy().astype(bool, copy=False)

    trajectories: dict[str, np.ndarray] = {}
    epochs = None
    for name in metrics:
        col = column(name)
        want = pa.bool_() if name == "correct" else pa.float16()
        if not pa.types.is_fixed_size_list(col.type) or col.type.value_type != want:
            raise DataError(f"{path}: column {name!r} is {col.type}, expected fixed_size_list<{want}>", fix)
        e = col.type.list_size
        if epochs is not None and e != epochs:
            raise DataError(f"{path}: column {name!r} has {e} epochs, other columns {epochs}", fix)
        epochs = e
        values = np.concatenate([chunk.flatten().to_numpy(zero_copy_only=False) for chunk in col.chunks]) \
            if col.num_chunks else np.empty(0, want.to_pandas_dtype())
        if len(values) != n * e:
            raise DataError(f"{path}: column {name!r} has missing entries", fix)
        values = values.reshape(n, e)
        if name != "correct":
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise DataError(f"{path}: {name} trajectory of sample {sample_ids[first]!r} has a NaN or infinite "
                                f"value ({int(bad.sum())} sample(s) affected)",
                                f"the proxy training diverged: lower the lr and re-run {STAGE}")
        trajectories[name] = values
        del col
    return Dynamics(sample_ids=sample_ids, fold=fold, is_oos=is_oos, trajectories=trajectories,
                    meta=table_meta(path), path=path)
