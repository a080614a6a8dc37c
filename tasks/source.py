"""source: a stat fingerprint of the raw data the prepare stage reads (always run; takes a moment).

The raw files may live outside the repository (a system package, a team's image folder), where DVC
cannot track them. This stage lists every file there with its size and modification time; prepare
depends on the list, so it re-runs when an image is added, removed or replaced, and only then.
Params: ``data``. Outs: ``artifacts/source/fingerprint.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from semiprune_core.data.sources import source_paths, stat_fingerprint
from semiprune_core.io import write_json

from ._stage import StageContext, run_stage

OUT = Path("artifacts/source/fingerprint.json")


def source(ctx: StageContext) -> None:
    files = stat_fingerprint(source_paths(ctx.params.data))
    write_json(OUT, {"source": ctx.params.data.source, "files": files})
    ctx.log.info("%d raw files fingerprinted", len(files))


def main() -> int:
    return run_stage("source", source)


if __name__ == "__main__":
    sys.exit(main())
