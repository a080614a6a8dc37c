"""Per-sample statistics of one forward pass: what the recorder stores for every sample and epoch."""

from __future__ import annotations

import torch
from torch import Tensor

from .store import FLOAT_METRICS, METRICS

__all__ = ["FLOAT_METRICS", "METRICS", "per_sample_stats"]


@torch.no_grad()
def per_sample_stats(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Statistics of each sample's softmax against its target label.

    logits   (B, C) float (any dtype/device; computed in float32), C >= 2
    targets  (B,) int class ids in 0..C-1
    Returns (B,) tensors on the same device:
      target_prob  q = p[y]
      margin       q - max_{k != y} p[k]                      (in [-1, 1]; AUM uses probabilities)
      loss         cross-entropy -log q, from log_softmax      (stable for extreme logits)
      entropy      -sum_k p[k] log p[k] in nats                (0 * log 0 = 0)
      el2n         ||p - onehot(y)||_2                         (in [0, sqrt 2])
      correct      bool, argmax p == y                        (ties: the first maximum, as torch.argmax)
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (B, C) with C >= 2, got {tuple(logits.shape)}")
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}")
    z = logits.float()
    y = targets.to(device=z.device, dtype=torch.long)[:, None]
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    q = p.gather(1, y)[:, 0]
    other = p.scatter(1, y, -1.0).amax(1)  # probabilities are >= 0, so -1 removes the target
    diff = p.scatter_add(1, y, torch.full_like(q[:, None], -1.0))
    return {
        "target_prob": q,
        "margin": q - other,
        "loss": -logp.gather(1, y)[:, 0],
        "entropy": -(p * logp).sum(1),  # logp is finite for finite logits, so p = 0 contributes 0
        "el2n": torch.linalg.vector_norm(diff, dim=1),
        "correct": z.argmax(1) == y[:, 0],
    }
