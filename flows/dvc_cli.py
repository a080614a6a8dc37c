"""DVC's command line as the flow runs a stage: ``python -m flows.dvc_cli ARGS`` is ``dvc ARGS``,
except that waiting for a busy repository lock (``--wait-for-lock``) tries every 50 ms, not every
0.5 s.

A ``dvc repro`` holds the repository's lock for a few tenths of a second while it checks its stage
and again while it records the outputs, and lets go while the command runs. The flow starts stages
side by side (``audit`` and ``evaluate`` after ``select``, the folds), so one of them often finds
the lock taken, and DVC's wait then sleeps in 0.5 s steps: when ``evaluate``, the run's last and
longest stage, lost that race (half the time), its command started 0.85-0.90 s after ``select``
ended instead of 0.33-0.35 s; with tries every 50 ms, 0.46-0.51 s (2 CPU cores).
"""

from __future__ import annotations

import sys

POLL_SECONDS = 0.05


def poll_lock_often() -> None:
    """Make DVC's lock wait try every ``POLL_SECONDS``: ``dvc.lock.Lock.lock`` sleeps
    ``DEFAULT_TIMEOUT / 6`` between tries (and gives up after 6 without ``--wait-for-lock``, which
    is why only commands that wait run through here)."""
    import dvc.lock

    dvc.lock.DEFAULT_TIMEOUT = POLL_SECONDS * 6


def main(argv: list[str]) -> int:
    poll_lock_often()
    from dvc.cli import main as dvc_main

    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
