"""Where the stages' artifacts live, and the readers more than one stage needs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from semiprune_core.data.manifest import HIDDEN, read_hidden_labels
from semiprune_core.data.prepared import PREPARE_DIR, Prepared
from semiprune_core.errors import DataError
from semiprune_core.io import atomic_path, read_table

SSL_MODEL = Path("artifacts/ssl/model.pt")
PSEUDO_LABELS = Path("artifacts/pseudo/pseudo_labels.parquet")
SCORES = Path("artifacts/scores/scores.parquet")
SELECTION = Path("artifacts/select/selection.parquet")
KEPT = Path("artifacts/select/kept.txt")
AUDIT = Path("artifacts/audit/audit.parquet")


def dynamics_path(fold: int) -> Path:
    return Path(f"artifacts/dynamics/fold_{fold}.parquet")


def load_targets(data: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train rows of ``data``, their target labels, is_seed: whether the target is a human label)
    from the pseudo_label stage, aligned by sample_id."""
    train = np.flatnonzero(data.split == "train")
    table = read_table(PSEUDO_LABELS, columns=["sample_id", "target", "label_source"], stage="pseudo_label")
    if not np.array_equal(table["sample_id"].to_numpy(zero_copy_only=False), data.sample_ids[train]):
        raise DataError(f"{PSEUDO_LABELS} does not list the manifest's train samples", "re-run pseudo_label (dvc repro)")
    is_seed = table["label_source"].to_numpy(zero_copy_only=False) == "human"
    return train, table["target"].to_numpy().astype(np.int64), is_seed


def hidden_truth(sample_ids: np.ndarray, *, prefer: str = "true_label") -> tuple[str, np.ndarray] | None:
    """(column, labels aligned to ``sample_ids``) of the hidden benchmark truth; None for real data.

    FOR REPORTS AND THE EVALUATE STAGE ONLY (see read_hidden_labels). ``prefer="clean_label"`` takes
    the clean class where the benchmark planted wrong labels, else ``true_label``.
    """
    hidden = read_hidden_labels(PREPARE_DIR / HIDDEN)
    if not hidden.num_rows:
        return None
    column = prefer if prefer in hidden.column_names else "true_label"
    truth = dict(zip(hidden["sample_id"].to_pylist(), hidden[column].to_pylist()))
    return column, np.array([truth[s] for s in sample_ids], dtype=np.int64)


def write_history(path: Path, history: list[dict], fields: list[str]) -> None:
    """A training history (one row per epoch) as CSV for ``dvc plots``; floats rounded to 6 places."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
