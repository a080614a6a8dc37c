"""scores: from every fold's dynamics, an out-of-sample and an in-sample value of every score.

Params: ``cv``, ``scores``. Outs: ``artifacts/scores/scores.parquet``, ``metrics/scores.json``.
Hidden true labels (benchmarks only) are read for the metrics alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from semiprune_core.errors import DataError
from semiprune_core.io import read_table, table_meta, write_json, write_table
from semiprune_core.scoring import auroc, combine_folds, spread_summary

from ._artifacts import PSEUDO_LABELS, SCORES, dynamics_path, hidden_truth
from ._stage import StageContext, run_stage

METRICS = Path("metrics/scores.json")


def scores(ctx: StageContext) -> None:
    cv, sc = ctx.params.cv, ctx.params.scores
    paths = [dynamics_path(k) for k in cv.folds]
    epochs = _check_horizons(paths, first_dual=sc.first_dual, first_el2n=sc.first_el2n)
    cols = combine_folds(paths, window=sc.window, first_dual=sc.first_dual, first_el2n=sc.first_el2n)
    table = pa.table({name: pa.array(values) for name, values in cols.items()})
    write_table(SCORES, table, meta={"params": ctx.params.to_dict()})
    metrics = {"n": int(table.num_rows), **epochs, "spread": {
        name: spread_summary(np.asarray(values, dtype=float))
        for name, values in cols.items() if name.startswith(("oos_", "ins_")) and np.asarray(values).dtype.kind == "f"
    }}
    metrics["wrong_target_auroc"] = _wrong_target_auroc(cols)
    write_json(METRICS, {**metrics, "wall_time_s": round(ctx.elapsed(), 2)})


def _check_horizons(paths: list[Path], *, first_dual: int, first_el2n: int) -> dict:
    """The epochs the folds recorded and their schedule's length; a fold stopped early by
    ``proxy.stop_after`` must still cover the early-epoch scores' horizons."""
    metas = []
    for path in paths:
        try:
            metas.append(table_meta(path))
        except (OSError, pa.ArrowInvalid):  # missing or unreadable: combine_folds says which and why
            metas.append({})
    recorded = min((int(m.get("epochs", 0)) for m in metas), default=0)
    planned = max((int(m.get("schedule_epochs", m.get("epochs", 0))) for m in metas), default=0)
    if 0 < recorded < planned:
        for name, value in (("first_dual", first_dual), ("first_el2n", first_el2n)):
            if value > recorded:
                raise DataError(f"scores.{name} is {value} epochs, but the folds stopped after {recorded} of {planned} "
                                f"(proxy.stop_after)", f"set proxy.stop_after to at least {value}, or scores.{name} to at most {recorded}")
    return {"epochs": recorded, "schedule_epochs": planned}


def _wrong_target_auroc(cols: dict[str, np.ndarray]) -> dict | None:
    """On benchmarks: how well a low AUM finds samples whose target label is wrong (report only)."""
    found = hidden_truth(cols["sample_id"], prefer="clean_label")
    if found is None:
        return None
    truth_col, truth = found
    pseudo = read_table(PSEUDO_LABELS, columns=["sample_id", "target"], stage="pseudo_label")
    target = dict(zip(pseudo["sample_id"].to_pylist(), pseudo["target"].to_pylist()))
    wrong = np.array([target[s] for s in cols["sample_id"]]) != truth
    out = {"truth": truth_col, "n_wrong": int(wrong.sum()), "n": int(len(wrong))}
    if 0 < wrong.sum() < len(wrong):
        for name in ("oos_aum", "ins_aum"):
            out[name] = auroc(-np.asarray(cols[name], dtype=float), wrong)
    return out


def main() -> int:
    return run_stage("scores", scores)


if __name__ == "__main__":
    sys.exit(main())
