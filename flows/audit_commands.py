"""``semiprune explain``, ``export`` and ``diff``: the audit table, read back for people and jobs."""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semiprune_core.audit import explain, near_matches
from semiprune_core.config import param_diff
from semiprune_core.errors import ConfigError
from semiprune_core.io import atomic_path, read_parquet

AUDIT = Path("artifacts/audit/audit.parquet")


def load_audit(ws: Path) -> tuple[pa.Table, dict]:
    """The audit table of workspace ``ws`` and its metadata; a clear error before any run."""
    path = ws / AUDIT
    if not path.exists():
        raise ConfigError(f"no audit table in {ws}: the pipeline has not run there yet",
                          "run `semiprune run` (with the same --profile/--set) first")
    table = read_parquet(path)
    meta = json.loads((table.schema.metadata or {}).get(b"semiprune", b"{}"))
    return table, meta


def explain_sample(ws: Path, sample_id: str) -> dict:
    table, meta = load_audit(ws)
    found = table.filter(pc.equal(table["sample_id"], sample_id))
    if not found.num_rows:
        near = near_matches(sample_id, table["sample_id"].to_pylist())
        hint = f"did you mean {', '.join(near)}?" if near else "list the ids with `semiprune export`"
        raise ConfigError(f"no sample {sample_id!r} in the audit table of {ws.name}", hint)
    root = meta.get("data_root")
    if root and not Path(root).is_absolute():
        root = str((ws / root).resolve())
    return explain(found.to_pylist()[0], n_pool=table.num_rows, class_names=meta.get("class_names") or [],
                   params=meta.get("params", {}), root=root)


def export_samples(ws: Path, *, pruned: bool, paths: bool, out: Path | None) -> int:
    """Write the kept (or pruned) samples: ids or file paths, as text, CSV or Parquet by ``out``'s suffix."""
    table, meta = load_audit(ws)
    chosen = table.filter(pc.invert(table["is_kept"]) if pruned else table["is_kept"])
    if paths:
        if pc.all(pc.is_null(table["path"])).as_py():
            raise ConfigError("this dataset has no image files (its samples come from array files)",
                              "export ids instead (drop --paths)")
        root = Path(meta.get("data_root") or ".")
        root = root if root.is_absolute() else (ws / root).resolve()
        chosen = chosen.append_column("file", pa.array([str(root / p) for p in chosen["path"].to_pylist()], pa.string()))
    key = "file" if paths else "sample_id"
    suffix = out.suffix.lower() if out else ".txt"
    if suffix not in (".txt", ".csv", ".parquet"):
        raise ConfigError(f"cannot export to {out}: unknown format {suffix!r}", "name the file .txt, .csv or .parquet")
    columns = [c for c in (key, "sample_id", "target", "label_source", "reason", "rank") if c in chosen.column_names]
    columns = list(dict.fromkeys(columns))
    if suffix == ".txt":
        text = "".join(f"{v}\n" for v in chosen[key].to_pylist())
        if out is None:
            sys.stdout.write(text)
        else:
            with atomic_path(out) as tmp:
                tmp.write_text(text, encoding="utf-8")
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        with atomic_path(out) as tmp:
            pcsv.write_csv(chosen.select(columns).cast(pa.schema(
                [pa.field(c, pa.string() if pa.types.is_dictionary(chosen.schema.field(c).type) else
                          chosen.schema.field(c).type) for c in columns])), tmp)
    else:
        with atomic_path(out) as tmp:
            pq.write_table(chosen.select(columns), tmp)
    return chosen.num_rows


def read_results(project: Path, ref: str) -> tuple[pa.Table, dict, str]:
    """The audit table of ``ref``: ``.`` (the project), a run under runs/, or a git revision (via dvc.api)."""
    if ref in (".", "project"):
        return (*load_audit(project), "the project")
    if (project / "runs" / ref).is_dir():
        return (*load_audit(project / "runs" / ref), f"run {ref}")
    import dvc.api
    from dvc.exceptions import DvcException
    from dvc.scm import SCMError
    from scmrepo.exceptions import SCMError as GitError

    try:
        with dvc.api.open(str(AUDIT), repo=str(project), rev=ref, mode="rb") as fh:
            table = read_parquet(io.BytesIO(fh.read()))
    except (SCMError, GitError):  # an unknown revision, no commits yet, or no git at all
        raise ConfigError(f"{ref!r} is neither a run under runs/ nor a git revision",
                          "name a run (ls runs/), '.', or a commit, branch or tag") from None
    except (DvcException, FileNotFoundError) as err:
        raise ConfigError(f"revision {ref!r} has no results ({type(err).__name__})",
                          "run the pipeline at that revision, commit its dvc.lock, and push or keep its cache") from None
    meta = json.loads((table.schema.metadata or {}).get(b"semiprune", b"{}"))
    return table, meta, f"revision {ref}"


def diff_results(project: Path, a: str, b: str) -> dict:
    """Which samples changed status between ``a`` and ``b``, and why, with counts per class."""
    ta, ma, la = read_results(project, a)
    tb, mb, lb = read_results(project, b)
    cols = ["sample_id", "target", "is_kept", "reason"]
    left = {r["sample_id"]: r for r in ta.select(cols).to_pylist()}
    right = {r["sample_id"]: r for r in tb.select(cols).to_pylist()}
    if set(left) != set(right):
        raise ConfigError(f"{la} and {lb} audit different pools ({len(left)} vs {len(right)} samples)",
                          "compare runs of the same dataset")
    names = mb.get("class_names") or ma.get("class_names") or []
    moves, per_class, why = Counter(), {}, Counter()
    for sid, x in left.items():
        y = right[sid]
        move = ("kept" if x["is_kept"] else "pruned") + " -> " + ("kept" if y["is_kept"] else "pruned")
        moves[move] += 1
        if x["is_kept"] != y["is_kept"]:
            name = names[y["target"]] if 0 <= y["target"] < len(names) else str(y["target"])
            per_class.setdefault(name, Counter())[move] += 1
            why[(x["reason"], y["reason"])] += 1
    params = [f"{k}: {a!r} -> {b!r}" for k, a, b in param_diff(ma.get("params", {}), mb.get("params", {}))]
    return {"a": la, "b": lb, "n": len(left), "moves": dict(moves), "params_changed": params,
            "per_class": {k: dict(v) for k, v in sorted(per_class.items())},
            "reasons": [{"a": ra, "b": rb, "samples": n} for (ra, rb), n in why.most_common()]}


def format_diff(d: dict) -> str:
    changed = d["moves"].get("kept -> pruned", 0) + d["moves"].get("pruned -> kept", 0)
    lines = [f"{d['a']} -> {d['b']}: {changed} of {d['n']} samples changed status "
             f"({d['moves'].get('kept -> pruned', 0)} kept -> pruned, {d['moves'].get('pruned -> kept', 0)} pruned -> kept)"]
    if d["params_changed"]:
        lines += ["params changed:", *(f"  {p}" for p in d["params_changed"])]
    if d["per_class"]:
        lines.append("per class (kept -> pruned / pruned -> kept):")
        lines += [f"  {name:<14} {c.get('kept -> pruned', 0):>6} / {c.get('pruned -> kept', 0):<6}" for name, c in d["per_class"].items()]
    if d["reasons"]:
        lines.append("why (reason before -> reason after):")
        lines += [f"  {r['samples']:>6}  {r['a']}  ->  {r['b']}" for r in d["reasons"][:10]]
    return "\n".join(lines)
