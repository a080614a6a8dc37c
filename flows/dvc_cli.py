"""DVC's command line as the flow runs a stage: ``python -m flows.dvc_cli ARGS`` is ``dvc ARGS``,
except that it replaces dvc.lock whole instead of rewriting it in place
(:func:`write_dvc_files_atomically`), that a run-cache lookup reads finished entries only
(:func:`read_finished_run_cache_entries_only`), and that waiting for a busy repository lock
(``--wait-for-lock``) tries every 50 ms, not every 0.5 s.

A ``dvc repro`` holds the repository's lock for a few tenths of a second while it checks its stage
and again while it records the outputs, and lets go while the command runs. The flow starts stages
side by side (``audit`` and ``evaluate`` after ``select``, the folds), so one of them often finds
the lock taken, and DVC's wait then sleeps in 0.5 s steps: when ``evaluate``, the run's last and
longest stage, lost that race (half the time), its command started 0.85-0.90 s after ``select``
ended instead of 0.33-0.35 s; with tries every 50 ms, 0.46-0.51 s (2 CPU cores).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .pids import pid_alive

POLL_SECONDS = 0.05


def poll_lock_often() -> None:
    """Make DVC's lock wait try every ``POLL_SECONDS``: ``dvc.lock.Lock.lock`` sleeps
    ``DEFAULT_TIMEOUT / 6`` between tries (and gives up after 6 without ``--wait-for-lock``, which
    is why only commands that wait run through here)."""
    import dvc.lock

    dvc.lock.DEFAULT_TIMEOUT = POLL_SECONDS * 6


def write_dvc_files_atomically() -> bool:
    """Make this process's DVC write dvc.lock (and any YAML file it writes) to a temporary file next
    to it and rename that onto it, so a killed writer leaves the old file or the new one, whole.

    DVC 3 opens the file for writing, which empties it, and then dumps the YAML into it. A DVC
    process killed in between (a timeout's tree kill, an out-of-memory kill, a killed flow run while
    ``audit`` records itself beside ``evaluate``) left an empty dvc.lock: the record of every stage
    gone, and every later run failing with "required key not provided, in schema". The temporary
    file is named after the writing process; one left by a writer that died is removed by the next
    write. Returns False (and changes nothing) when this DVC does not write through the function
    patched here; ``tests/flows/test_stages.py`` fails then.
    """
    try:
        from dvc.utils.serialize import _common, _json, _py, _toml, _yaml
    except ImportError:
        return False
    modules = (_common, _json, _py, _toml, _yaml)
    original = getattr(_common, "_dump_data", None)
    if getattr(original, "atomic", False):
        return True
    if original is None or any(getattr(m, "_dump_data", None) is not original for m in modules):
        return False

    def dump_data(path, data, dumper, fs=None, **dumper_args):
        if fs is not None and getattr(fs, "protocol", None) != "local":
            return original(path, data, dumper=dumper, fs=fs, **dumper_args)
        target = Path(os.path.realpath(os.fspath(path)))  # through a link, as DVC's own write goes
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), mode)
                dumper(data, fh, **dumper_args)
                fh.flush()
                os.fsync(fh.fileno())
            if os.environ.get("SEMIPRUNE_HALT_AT"):  # kill tests: written, not yet in place
                from semiprune_core.io import halt_point

                halt_point(f"write:{target.name}")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a killed writer's
            pid = stale.name[len(target.name) + 2:-len(".tmp")]
            if pid.isdigit() and not pid_alive(int(pid)):
                stale.unlink(missing_ok=True)

    dump_data.atomic = True
    for module in modules:
        module._dump_data = dump_data
    return True


def read_finished_run_cache_entries_only() -> bool:
    """Make this process's DVC look a stage up in the run-cache among finished entries only.

    DVC records a run by making the folder of the stage's key, writing the entry to a temporary
    dotfile in it and renaming that into place; a lookup takes the newest name in the folder. A DVC
    killed in between (a killed flow run while ``audit`` records itself beside ``evaluate``) leaves
    the folder empty, and every later lookup of that stage failed with "join() argument must be
    str, bytes, or os.PathLike object, not 'NoneType'", retries included, until someone deleted the
    folder by hand. In a cache that teams share, a lookup could also take another process's
    half-written temporary file for the entry, call it corrupted and delete it under its writer.
    Here a folder without a finished entry means no run was recorded, and temporary files are left
    to their writers. Returns False (and changes nothing) when this DVC's run-cache is not built
    the way this expects; ``tests/flows/test_stages.py`` fails then.
    """
    try:
        from dvc.stage import cache as run_cache
    except ImportError:
        return False
    original = getattr(run_cache.StageCache, "_load", None)
    if getattr(original, "finished_only", False):
        return True
    needed = (hasattr(run_cache, "_get_stage_hash"), hasattr(run_cache.StageCache, "_get_cache_dir"),
              hasattr(run_cache.StageCache, "_load_cache"))
    if original is None or not all(needed):
        return False

    def load(self, stage):
        key = run_cache._get_stage_hash(stage)
        if not key:
            return None
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._get_cache_dir(key)):
                if not entry.name.startswith("."):  # DVC's and this module's temporary files
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile as corrupted
                        entries.append((entry.stat().st_mtime, entry.name))
        if not entries:
            return None
        newest = max(entries, key=lambda e: e[0])[1]  # as DVC picks it
        return self._load_cache(key, newest) or None

    load.finished_only = True
    run_cache.StageCache._load = load
    return True


def keep_dvc_records_whole() -> None:
    """What every DVC process of the flow changes in DVC, so that a killed one leaves nothing that
    fails the next: dvc.lock replaced whole, run-cache lookups among finished entries only."""
    write_dvc_files_atomically()
    read_finished_run_cache_entries_only()


def main(argv: list[str]) -> int:
    keep_dvc_records_whole()
    poll_lock_often()
    from dvc.cli import main as dvc_main

    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
