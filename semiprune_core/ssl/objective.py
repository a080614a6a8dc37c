"""Semi-supervised training as one engine objective; each algorithm is a threshold policy.

FixMatch (Sohn et al. 2020): per step a labeled batch of B and an unlabeled batch of mu*B. The
unlabeled batch is seen twice, as a weak view (flip + pad-and-crop) and a strong view (RandAugment
+ cutout). Where the weak view's confidence passes the policy's threshold, its argmax is the target
of the strong view. loss = CE(labeled) + lambda_u * mean(mask * CE(strong, argmax(weak))).
All three parts go through the model in one forward (one set of BatchNorm statistics).

Algorithms differ only in the mask, so each is a small :class:`ThresholdPolicy`:
  - :class:`FixedThreshold`      FixMatch: confidence >= tau.
  - :class:`FlexMatchThreshold`  class-wise thresholds scaled by how far each class is learned
                                 (Zhang et al. 2021, curriculum pseudo-labeling).
  - :class:`FreeMatchThreshold`  self-adaptive global and class-wise thresholds from EMAs of the
                                 model's confidence (Wang et al. 2023; the paper's fairness loss is
                                 not included).
``policy=None`` is the supervised baseline: the same loop, model and steps on the labeled batch alone.

Policies carry state across steps; the objective exposes it through ``state_dict`` /
``load_state_dict`` so the engine's checkpoints resume it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..training.augment import apply_view
from ..training.engine import StepOutput, as_uint8_images, to_float


class ThresholdPolicy(Protocol):
    def mask(self, probs: Tensor, rows: Tensor) -> Tensor:
        """(B, C) weak-view probabilities of unlabeled rows (B,) -> (B,) float mask in [0, 1]."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def to(self, device: torch.device) -> "ThresholdPolicy": ...


def _check_tau(tau: float) -> float:
    if not 0 < tau <= 1:
        raise ConfigError(f"confidence threshold must be in (0, 1], got {tau!r}", "set ssl.threshold, e.g. 0.95")
    return float(tau)


class _TensorState:
    """State kept as named tensors; subclasses list them in ``_state``."""

    _state: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).clone() for name in self._state}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name in self._state:
            current = getattr(self, name)
            value = state[name]
            if value.shape != current.shape:
                raise ValueError(f"{type(self).__name__}.{name}: shape {tuple(value.shape)} != {tuple(current.shape)}")
            setattr(self, name, value.to(current.device, current.dtype))

    def to(self, device: torch.device):
        for name in self._state:
            setattr(self, name, getattr(self, name).to(device))
        return self


class FixedThreshold(_TensorState):
    """FixMatch: keep a pseudo-label when its confidence is at least ``tau``."""

    def __init__(self, tau: float = 0.95):
        self.tau = _check_tau(tau)

    def mask(self, probs: Tensor, rows: Tensor) -> Tensor:
        return (probs.max(1).values >= self.tau).float()


class FlexMatchThreshold(_TensorState):
    """FlexMatch: class c's threshold is tau * M(beta_c), M(x) = x / (2 - x).

    beta_c = sigma_c / max(max_c' sigma_c', n_unused): sigma_c counts unlabeled samples whose latest
    confident (>= tau) prediction is c; n_unused counts samples never predicted confidently (the
    threshold warm-up). Classes the model has learned least get the lowest thresholds.
    """

    _state = ("selected",)

    def __init__(self, tau: float, *, n_unlabeled: int, num_classes: int):
        self.tau = _check_tau(tau)
        self.num_classes = num_classes
        self.selected = torch.full((n_unlabeled,), -1, dtype=torch.long)

    def mask(self, probs: Tensor, rows: Tensor) -> Tensor:
        conf, pred = probs.max(1)
        chosen = self.selected[self.selected >= 0]
        sigma = torch.bincount(chosen, minlength=self.num_classes).float()
        unused = (self.selected < 0).sum().float()
        beta = sigma / torch.clamp(torch.maximum(sigma.max(), unused), min=1.0)
        threshold = self.tau * (beta / (2.0 - beta))
        mask = (conf >= threshold[pred]).float()
        confident = conf >= self.tau
        self.selected[rows[confident]] = pred[confident]
        return mask


class FreeMatchThreshold(_TensorState):
    """FreeMatch self-adaptive thresholding: class c's threshold is tau_t * p_t[c] / max(p_t).

    tau_t is an EMA of the mean top-1 confidence on unlabeled batches and p_t an EMA of the mean
    probability vector (momentum ``momentum``), both starting at 1/C; updated before masking.
    """

    _state = ("tau_t", "p_t")

    def __init__(self, *, num_classes: int, momentum: float = 0.999):
        if not 0 < momentum < 1:
            raise ConfigError(f"freematch momentum must be in (0, 1), got {momentum!r}", "set ssl.ema_momentum, e.g. 0.999")
        self.momentum = float(momentum)
        self.tau_t = torch.tensor(1.0 / num_classes)
        self.p_t = torch.full((num_classes,), 1.0 / num_classes)

    def mask(self, probs: Tensor, rows: Tensor) -> Tensor:
        conf, pred = probs.max(1)
        m = self.momentum
        self.tau_t = m * self.tau_t + (1 - m) * conf.mean()
        self.p_t = m * self.p_t + (1 - m) * probs.mean(0)
        threshold = self.tau_t * self.p_t / self.p_t.max()
        return (conf >= threshold[pred]).float()


@dataclass
class SSLBatch:
    labeled_rows: Tensor  # (B,)
    labeled: Tensor  # (B, C, H, W) uint8, weak view
    targets: Tensor  # (B,)
    unlabeled_rows: Tensor | None  # (mu*B,)
    weak: Tensor | None  # (mu*B, C, H, W) uint8
    strong: Tensor | None  # (mu*B, C, H, W) uint8


class SemiSupervisedObjective:
    """Labeled images + targets, unlabeled images, and a threshold policy (None = supervised only).

    labeled_images   (L, C, H, W) uint8;  labeled_targets (L,) int
    unlabeled_images (U, C, H, W) uint8 (U may be 0: then only the labeled loss is trained)
    mu               unlabeled batch = mu * B
    lambda_u         weight of the unlabeled loss
    confident_tau    the fixed threshold whose pass rate is logged for every policy (comparable stat)
    labeled_ids      (L,) ids reported to hooks (default 0..L-1)

    One epoch is one pass over the unlabeled pool in batches of mu*B (a pass over the labeled set when
    there is no pool); labeled batches cycle through seeded permutations of the labeled set. The
    supervised baseline (policy None) takes the same number of steps, so both get the same schedule.
    """

    def __init__(
        self,
        labeled_images,
        labeled_targets,
        unlabeled_images,
        *,
        policy: ThresholdPolicy | None,
        mu: int = 7,
        lambda_u: float = 1.0,
        confident_tau: float = 0.95,
        labeled_ids=None,
    ):
        self.labeled = as_uint8_images(labeled_images, name="labeled images")
        self.targets = torch.as_tensor(np.asarray(labeled_targets)).long()
        self.unlabeled = as_uint8_images(unlabeled_images, name="unlabeled images")
        if len(self.labeled) == 0:
            raise ConfigError("no labeled samples to train on", "label some samples (data.labeled) and re-run prepare")
        if self.targets.shape != (len(self.labeled),):
            raise ValueError("labeled_targets must have one entry per labeled image")
        if not isinstance(mu, int) or mu < 1:
            raise ConfigError(f"unlabeled ratio mu must be a positive integer, got {mu!r}", "set ssl.mu, e.g. 7")
        if not lambda_u >= 0:
            raise ConfigError(f"lambda_u must be >= 0, got {lambda_u!r}", "set ssl.lambda_u, e.g. 1.0")
        self.policy, self.mu, self.lambda_u = policy, mu, float(lambda_u)
        self.confident_tau = _check_tau(confident_tau)
        self.labeled_ids = torch.arange(len(self.labeled)) if labeled_ids is None else torch.as_tensor(labeled_ids).long()

    @property
    def uses_unlabeled(self) -> bool:
        return len(self.unlabeled) > 0

    def to(self, device: torch.device) -> "SemiSupervisedObjective":
        self.labeled, self.targets = self.labeled.to(device), self.targets.to(device)
        self.unlabeled, self.labeled_ids = self.unlabeled.to(device), self.labeled_ids.to(device)
        if self.policy is not None:
            self.policy.to(device)
        return self

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.uses_unlabeled:
            return math.ceil(len(self.unlabeled) / (self.mu * batch_size))
        return math.ceil(len(self.labeled) / batch_size)

    def batches(self, epoch: int, batch_size: int, generator: torch.Generator) -> Iterator[SSLBatch]:
        device = self.labeled.device
        steps = self.steps_per_epoch(batch_size)
        n_lab = len(self.labeled)
        b = min(batch_size, n_lab) if not self.uses_unlabeled else batch_size
        cycles = math.ceil(steps * b / n_lab)
        lab_rows = torch.cat([torch.randperm(n_lab, generator=generator, device=device) for _ in range(cycles)])
        lab_rows = lab_rows[: steps * b].view(steps, b)
        unl_chunks = (
            torch.randperm(len(self.unlabeled), generator=generator, device=device).tensor_split(steps)
            if self.uses_unlabeled else [None] * steps
        )
        for rows, urows in zip(lab_rows, unl_chunks):
            labeled = apply_view(self.labeled.index_select(0, rows), "weak", generator)
            weak = strong = None
            if urows is not None:
                u = self.unlabeled.index_select(0, urows)
                weak = apply_view(u, "weak", generator)
                strong = apply_view(u, "strong", generator)
            yield SSLBatch(rows, labeled, self.targets[rows], urows, weak, strong)

    def loss(self, model: nn.Module, batch: SSLBatch) -> StepOutput:
        b = len(batch.labeled_rows)
        train_unlabeled = self.policy is not None and batch.weak is not None
        if not train_unlabeled:
            logits_l = model(to_float(batch.labeled))
            loss = F.cross_entropy(logits_l, batch.targets)
            return StepOutput(loss, b, self.labeled_ids[batch.labeled_rows], logits_l, batch.targets)
        logits = model(to_float(torch.cat([batch.labeled, batch.weak, batch.strong])))
        n_u = len(batch.weak)
        logits_l, logits_w, logits_s = logits[:b], logits[b : b + n_u], logits[b + n_u :]
        loss_l = F.cross_entropy(logits_l, batch.targets)
        with torch.no_grad():
            probs = logits_w.detach().float().softmax(1)
            mask = self.policy.mask(probs, batch.unlabeled_rows)
            pseudo = probs.argmax(1)
        loss_u = (F.cross_entropy(logits_s, pseudo, reduction="none") * mask).mean()
        stats = {
            "loss_labeled": loss_l.detach(),
            "loss_unlabeled": loss_u.detach(),
            "mask_rate": mask.mean(),
            "confident_rate": (probs.max(1).values >= self.confident_tau).float().mean(),
        }
        return StepOutput(loss_l + self.lambda_u * loss_u, b + 2 * n_u, self.labeled_ids[batch.labeled_rows],
                          logits_l, batch.targets, stats)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.policy is None else self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.policy is not None:
            self.policy.load_state_dict(state)


ALGORITHMS = ("fixmatch", "flexmatch", "freematch", "supervised")


def make_policy(algorithm: str, *, threshold: float, num_classes: int, n_unlabeled: int,
                freematch_momentum: float = 0.999) -> ThresholdPolicy | None:
    """The threshold policy of ``algorithm`` (None for the supervised baseline)."""
    if algorithm == "fixmatch":
        return FixedThreshold(threshold)
    if algorithm == "flexmatch":
        return FlexMatchThreshold(threshold, n_unlabeled=n_unlabeled, num_classes=num_classes)
    if algorithm == "freematch":
        return FreeMatchThreshold(num_classes=num_classes, momentum=freematch_momentum)
    if algorithm == "supervised":
        return None
    raise ConfigError(f"unknown SSL algorithm {algorithm!r}", f"choose one of {', '.join(ALGORITHMS)}")
