"""The audit table: one row per pool sample with every piece of evidence behind its fate.

Pure functions over Arrow tables: :func:`audit_table` joins the manifest, the targets and their
source, the pseudo-label confidence, the fold, every ``oos_``/``ins_`` score with its percentile, and
the selection (strategy, stratum, rank, kept, reason). :func:`explain` turns one row into the short
account a person reads.
"""

from __future__ import annotations

import difflib

import numpy as np
import pyarrow as pa

from .errors import DataError
from .io import column_array
from .selection.select import EASIER_IS_HIGHER
from .selection.strategies import REASONS, auto_cutoff

#: What each audit column holds (written into the file's metadata).
COLUMNS = {
    "sample_id": "the sample's id (the manifest's)",
    "path": "image file relative to data.root (folder datasets; null otherwise)",
    "is_labeled": "in the human-labeled seed set",
    "label": "the human label (seed samples only)",
    "target": "the label the pipeline used: the human label, else the pseudo-label",
    "label_source": "human or pseudo",
    "pseudo_label": "the SSL model's prediction",
    "pseudo_confidence": "the SSL model's probability for its prediction",
    "fold": "the fold whose proxy never trained on this sample (it produced the oos_ scores)",
    "strategy": "select.strategy",
    "score_used": "select.score: the score the strategy ranked by",
    "stratum": "ccs: score stratum; prototypicality: k-means cluster; else null",
    "rank": "position from easiest (0) to hardest by score_used",
    "is_kept": "in the coreset",
    "reason": "why it was kept or pruned (a fixed vocabulary)",
    "hidden_true_label": "benchmarks only: the dataset's true label, never seen by the method",
}


def percentile(values: np.ndarray) -> np.ndarray:
    """Each value's percentile (0-100, ties averaged) among the finite values; NaN stays NaN."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return out
    v = values[finite]
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    lo = np.searchsorted(sorted_v, v, side="left")
    hi = np.searchsorted(sorted_v, v, side="right")
    out[finite] = 100.0 * ((lo + hi - 1) / 2) / max(n - 1, 1)
    return out


def _aligned(table: pa.Table, ids: np.ndarray, name: str) -> pa.Table:
    if not np.array_equal(column_array(table["sample_id"]), ids):
        raise DataError(f"the {name} table does not list the pool's samples in the manifest's order",
                        "re-run the pipeline (dvc repro)")
    return table


def audit_table(manifest: pa.Table, pseudo: pa.Table, scores: pa.Table, selection: pa.Table, *,
                strategy: str, score_used: str, hidden: pa.Table | None = None) -> pa.Table:
    """One row per pool (train) sample, in the manifest's order."""
    import pyarrow.compute as pc

    pool = manifest.filter(pc.equal(manifest["split"], "train"))
    ids = column_array(pool["sample_id"])
    pseudo, scores, selection = (_aligned(t, ids, n) for t, n in ((pseudo, "pseudo-label"), (scores, "scores"),
                                                                    (selection, "selection")))
    label = pool["label"]
    columns = {
        "sample_id": pool["sample_id"],
        "path": pool["path"],
        "is_labeled": pool["is_labeled"],
        "label": pc.if_else(pool["is_labeled"], label, pa.scalar(None, label.type)),
        "target": pseudo["target"],
        "label_source": pseudo["label_source"].dictionary_encode(),
        "pseudo_label": pseudo["pseudo_label"],
        "pseudo_confidence": pseudo["confidence"],
        "fold": scores["fold"],
    }
    if "is_corrupted" in pool.column_names:
        columns["is_corrupted"] = pool["is_corrupted"]
    for name in scores.column_names:
        if name.startswith(("oos_", "ins_")):
            columns[name] = scores[name]
            columns[f"{name}_pct"] = pa.array(percentile(column_array(scores[name])), pa.float32())
    n = len(ids)
    columns |= {
        "strategy": pa.array([strategy] * n, pa.string()).dictionary_encode(),
        "score_used": pa.array([score_used] * n, pa.string()).dictionary_encode(),
        "stratum": selection["stratum"],
        "rank": selection["rank"],
        "is_kept": selection["is_kept"],
        "reason": selection["reason"],
    }
    if hidden is not None and hidden.num_rows:
        truth = dict(zip(hidden["sample_id"].to_pylist(), hidden["true_label"].to_pylist()))
        columns["hidden_true_label"] = pa.array([truth.get(s) for s in ids], pa.int16())
    return pa.table(columns)


def near_matches(sample_id: str, ids: list[str], n: int = 3) -> list[str]:
    """The ids most like ``sample_id``: the same number first (train/15 for train/000015), then look-alikes."""
    digits = sample_id.rpartition("/")[2].lstrip("0")
    same = [i for i in ids if digits and i.rpartition("/")[2].lstrip("0") == digits] if digits.isdigit() else []
    return list(dict.fromkeys(same + difflib.get_close_matches(sample_id, ids, n=n, cutoff=0.6)))[:n]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def _clean(value):
    """NaN and infinities as None (JSON has neither)."""
    return value if not isinstance(value, float) or _finite(value) else None


def _name(index, class_names: list[str]) -> str:
    if index is None:
        return "none"
    return f"{class_names[int(index)]!r}" if 0 <= int(index) < len(class_names) else str(index)


def _rule(reason: str) -> str:
    known = {text.split("{")[0].rstrip(): key for key, text in REASONS.items()}
    for prefix, key in known.items():
        if reason.startswith(prefix):
            return key
    return "unknown"


def explain(row: dict, *, n_pool: int, class_names: list[str], params: dict, root: str | None = None) -> dict:
    """One sample's fate as facts (``--json``) and as a few lines of text (``lines``)."""
    used = row["score_used"]
    variant, _, kind = used.partition("_")
    other = f"{'ins' if variant == 'oos' else 'oos'}_{kind}"
    select = params.get("select", {})
    facts = {
        "sample_id": row["sample_id"], "is_kept": bool(row["is_kept"]), "reason": row["reason"],
        "rule": _rule(row["reason"]), "strategy": row["strategy"], "score_used": used,
        "rank": int(row["rank"]), "n_pool": n_pool, "target": _name(row["target"], class_names).strip("'"),
        "label_source": row["label_source"], "pseudo_label": _name(row["pseudo_label"], class_names).strip("'"),
        "pseudo_confidence": row["pseudo_confidence"], "fold": row["fold"],
        "scores": {k: _clean(row[k]) for k in (used, other, "oos_aum", "ins_aum", "oos_forgetting", "oos_el2n") if k in row},
        "percentiles": {k: _clean(row.get(f"{k}_pct")) for k in (used, other) if f"{k}_pct" in row},
        "stratum": row.get("stratum"), "path": row.get("path"),
        "file": f"{root.rstrip('/')}/{row['path']}" if root and row.get("path") else None,
        "hidden_true_label": _name(row["hidden_true_label"], class_names).strip("'")
        if row.get("hidden_true_label") is not None else None,
        "select": {k: select.get(k) for k in ("ratio", "strategy", "score", "cutoff", "strata", "class_balance")},
    }
    cutoff = select.get("cutoff")
    if cutoff == "auto" and select.get("ratio") is not None:
        cutoff = f"{auto_cutoff(select['ratio'])} (auto)"
    verdict = "KEPT" if facts["is_kept"] else "PRUNED"
    if row["label_source"] == "human":
        label_line = f"label {_name(row['target'], class_names)}: a human label from the seed set"
    elif row["label_source"] == "oracle":
        label_line = f"label {_name(row['target'], class_names)}: the dataset's true label (full-label oracle baseline)"
    elif row["label_source"] == "cluster":
        label_line = (f"target: k-means cluster {row['target']} (label-free baseline; "
                      f"confidence {row['pseudo_confidence']:.2f})")
    else:
        label_line = (f"label {_name(row['target'], class_names)}: a pseudo-label from the SSL model "
                      f"(confidence {row['pseudo_confidence']:.2f})")
    lines = [f"{row['sample_id']}: {verdict} - {row['reason']}", f"  {label_line}"]
    if facts["hidden_true_label"] is not None:
        right = facts["hidden_true_label"] == facts["target"]
        lines.append(f"  benchmark truth: {facts['hidden_true_label']!r} (the target is {'right' if right else 'WRONG'})")

    def judged(score: str, who: str) -> str:
        pct = row.get(f"{score}_pct")
        if pct is None or pct != pct:
            where = "no value"
        else:
            harder = "lower" if score.partition("_")[2] in EASIER_IS_HIGHER else "higher"
            where = f"at percentile {pct:.0f} of the pool ({harder} = harder)"
        value = row.get(score)
        return f"  {who}: {score} = {value:.3f}, {where}" if _finite(value) else f"  {who}: {score}: {where}"

    if f"oos_{kind}" in row:
        lines.append(judged(f"oos_{kind}", f"the unseen model (fold {row['fold']}, never trained on it)"))
    if f"ins_{kind}" in row:
        lines.append(judged(f"ins_{kind}", "the models that trained on it"))
    ratio = select.get("ratio")
    rule = (f"  rule: strategy {row['strategy']} by {used} at pruning ratio {ratio}"
            + (f", cutoff {cutoff}" if row["strategy"] in ("aum_cutoff", "ccs") else "")
            + f"; rank {int(row['rank']) + 1:,} of {n_pool:,} from the easiest")
    lines.append(rule)
    if facts["file"]:
        lines.append(f"  file: {facts['file']}")
    return {**facts, "lines": lines}
