"""prepare: read the dataset into a manifest with stable sample ids and choose the labeled subset.

Params: ``base``, ``data``. Outs: ``artifacts/prepare/{manifest,images,hidden_labels}.parquet``,
``metrics/prepare.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from semiprune_core.data import build_pool, write_prepare_outputs
from semiprune_core.io import write_json

from ._stage import StageContext, run_stage

OUT = Path("artifacts/prepare")
METRICS = Path("metrics/prepare.json")


def prepare(ctx: StageContext) -> None:
    p = ctx.params
    pool = build_pool(p.data, seed=p.base.seed, cache_dir=ctx.scratch / "decoded")
    with ctx.staged(OUT) as (tmp,):
        metrics = write_prepare_outputs(pool, tmp, meta={"params": p.to_dict()})
    write_json(METRICS, {**metrics, "wall_time_s": round(ctx.elapsed(), 3)})


def main() -> int:
    return run_stage("prepare", prepare)


if __name__ == "__main__":
    sys.exit(main())
