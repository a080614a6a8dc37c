"""Training dynamics -> per-sample scores: pure numpy, (N, E) trajectories in, (N,) scores out.

- :mod:`.scores`  — AUM, forgetting, EL2N, entropy, loss, mean target probability, DynUnc, DUAL and
  :func:`compute_scores` (all by name);
- :mod:`.folds`   — :func:`combine_folds`: ``oos_<score>`` / ``ins_<score>`` from the K fold files;
- :mod:`.summary` — :func:`spread_summary`, :func:`auroc` for reports.
"""

from .folds import combine_folds
from .scores import (
    HIGHER_MEANS,
    SCORES,
    aum,
    compute_scores,
    dual,
    dynunc,
    el2n,
    entropy,
    forgetting,
    loss,
    never_learned,
    target_prob_mean,
)
from .summary import auroc, rankdata, spread_summary

__all__ = [
    "HIGHER_MEANS", "SCORES", "aum", "auroc", "combine_folds", "compute_scores", "dual", "dynunc", "el2n", "entropy",
    "forgetting", "loss", "never_learned", "rankdata", "spread_summary", "target_prob_mean",
]
