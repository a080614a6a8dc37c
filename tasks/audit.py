"""audit: one row per pool sample with the evidence behind its fate (``artifacts/audit/audit.parquet``).

Joins the manifest, target and its source, pseudo-label confidence, fold, every ``oos_``/``ins_``
score with its percentile, and the selection. The file's metadata holds the run's params, the
code version and the SHA-256 of every input, so a table found on its own still says what made it.
Readable as is with pandas, polars or DuckDB. Hidden true labels (benchmarks only) are joined for
auditing; no decision reads them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from semiprune_core import __version__
from semiprune_core.audit import COLUMNS, audit_table
from semiprune_core.data.manifest import HIDDEN, MANIFEST, read_hidden_labels, read_manifest
from semiprune_core.data.prepared import PREPARE_DIR
from semiprune_core.io import column_array, read_table, sha256_file, table_meta, write_table

from ._artifacts import AUDIT, PSEUDO_LABELS, SCORES, SELECTION, write_history
from ._stage import StageContext, run_stage

CLASS_COUNTS = Path("plots/class_counts.csv")


def code_version() -> dict:
    """semiprune's version and, where the code is a git checkout, its commit and whether it was edited."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "semiprune_core", "tasks") if commit else None
    return {"semiprune": __version__, "git_commit": commit, "git_dirty": bool(dirty) if commit else None}


def audit_stage(ctx: StageContext) -> None:
    manifest_path = PREPARE_DIR / MANIFEST
    manifest = read_manifest(manifest_path)
    inputs = [manifest_path, PSEUDO_LABELS, SCORES, SELECTION]
    selection = read_table(SELECTION, stage="select")
    sel_meta = table_meta(selection)
    s = sel_meta.get("params", {}).get("select", {})
    hidden = read_hidden_labels(PREPARE_DIR / HIDDEN)
    table = audit_table(manifest, read_table(PSEUDO_LABELS, stage="pseudo_label"), read_table(SCORES, stage="scores"),
                        selection, strategy=s.get("strategy", "unknown"), score_used=s.get("score", "unknown"),
                        hidden=hidden)
    meta = {
        "params": ctx.params.to_dict(),
        "code_version": code_version(),
        "inputs": {str(p): sha256_file(p) for p in inputs},
        "class_names": table_meta(manifest).get("class_names"),
        "data_root": ctx.params.data.root if "data" in ctx.params else None,
        "columns": {**COLUMNS, "oos_*": "score from the fold model that never trained on the sample",
                    "ins_*": "score from the models that trained on it", "*_pct": "percentile of that score in the pool"},
    }
    write_table(AUDIT, table, meta=meta)
    _class_counts(table, meta["class_names"] or [])
    ctx.log.info("audit: %d samples, %d columns", table.num_rows, table.num_columns)


def _class_counts(table, class_names: list[str]) -> None:
    """Kept and pruned per target class, for ``dvc plots show``."""
    import numpy as np

    target = table["target"].to_numpy().astype(np.int64)
    kept = column_array(table["is_kept"])
    rows = [{"class": name, "kept": int((kept & (target == c)).sum()), "pruned": int((~kept & (target == c)).sum())}
            for c, name in enumerate(class_names)]
    write_history(CLASS_COUNTS, rows, ["class", "kept", "pruned"])


def main() -> int:
    return run_stage("audit", audit_stage)


if __name__ == "__main__":
    sys.exit(main())

