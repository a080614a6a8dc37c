"""Per-sample, per-epoch training dynamics: statistics, the recorder hook, the Parquet table.

- :func:`per_sample_stats` — target probability, margin, loss, entropy, EL2N, correctness of a batch;
- :class:`DynamicsRecorder` — engine hook recording one proxy model (in-sample + held-out fold);
- :func:`write_dynamics` / :func:`read_dynamics` — the ``fold_<k>.parquet`` table (see :mod:`.store`).
"""

from .recorder import DynamicsRecorder
from .stats import FLOAT_METRICS, METRICS, per_sample_stats
from .store import Dynamics, dynamics_schema, read_dynamics, write_dynamics

__all__ = ["FLOAT_METRICS", "METRICS", "Dynamics", "DynamicsRecorder", "dynamics_schema", "per_sample_stats",
           "read_dynamics", "write_dynamics"]
