"""Per-sample, per-epoch training dynamics: statistics, the recorder hook, the Parquet table.

- :func:`per_sample_stats` — target probability, margin, loss, entropy, EL2N, correctness of a batch;
- :class:`DynamicsRecorder` — engine hook recording one proxy model (in-sample + held-out fold);
- :func:`write_dynamics` / :func:`read_dynamics` — the ``fold_<k>.parquet`` table (see :mod:`.store`).

The table functions need only numpy and pyarrow; the torch parts (:func:`per_sample_stats`,
:class:`DynamicsRecorder`) are imported on first use, so scoring never loads torch.
"""

from typing import TYPE_CHECKING, Any

from .store import (
    FLOAT_METRICS,
    METRICS,
    Dynamics,
    dynamics_schema,
    read_dynamics,
    write_dynamics,
)

if TYPE_CHECKING:
    from .recorder import DynamicsRecorder
    from .stats import per_sample_stats

_LAZY = {"DynamicsRecorder": ".recorder", "per_sample_stats": ".stats"}

__all__ = ["FLOAT_METRICS", "METRICS", "Dynamics", "DynamicsRecorder", "dynamics_schema", "per_sample_stats",
           "read_dynamics", "write_dynamics"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
