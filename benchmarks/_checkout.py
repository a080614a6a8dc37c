"""Imported first by the benchmark scripts: the checkout they live in goes ahead of the installed
package on ``sys.path``.

A script's own folder is what Python puts first, so without this ``import semiprune_core`` found
the editable install, and a benchmark run from another worktree (an A/B against older code)
measured the install's code, not the worktree's.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path[:2]:
    sys.path.insert(1, ROOT)  # after the script's folder (bench_engine imported by name), before site-packages
