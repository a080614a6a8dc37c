"""The one training engine: supervised training, FixMatch and proxy training all run through :func:`fit`.

Shape of a run (airbench style): the whole dataset lives on the device as one uint8 tensor
(N, C, H, W); each epoch an :class:`Objective` slices batches from a seeded permutation and
augments them as whole tensors; :func:`fit` owns the loop: SGD (Nesterov) with a per-batch
warmup + cosine schedule, an optional EMA of the weights, hooks, progress, per-epoch checkpoints.

Conventions
  - Pixels: uint8 0..255 everywhere until :func:`to_float`, the one place input is normalised:
    ``x / 127.5 - 1`` (a fixed map to [-1, 1]; every model starts with BatchNorm after its first
    layer, so per-dataset mean/std buy nothing and would have to travel with every saved model).
  - Randomness: epoch ``e`` uses a ``torch.Generator`` seeded with ``stream_seed(seed, "epoch", e)``
    for batch order and augmentation, so a resumed run repeats an uninterrupted one exactly.
    Initial weights are the caller's (``create_model(..., seed=...)``). No global state is changed.
  - Device: ``resolve_device("auto")`` picks CUDA when present. Conv models use channels_last on
    every device (measured ~1.3-1.5x faster on CPU too).
  - Precision: ``resolve_precision("auto", device)`` runs forwards under bf16 autocast where the
    hardware computes bf16 natively (CUDA; CPUs with AMX or AVX512-BF16: about 1.8x faster training
    on a 2-core Sapphire Rapids), fp32 elsewhere (emulated bf16 would be slower). Weights, optimiser
    state and losses stay fp32.
  - Epochs are numbered from 0 in code, hooks and history; log lines say "epoch e+1/E".
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import ConfigError
from ..io import atomic_path, halt_point
from ..seeding import stream_seed
from .augment import VIEWS, apply_view
from .sgd import SGD

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
# A checkpoint file is this magic, the payload's SHA-256 (hex) and a newline, then torch.save's bytes:
# a resume loads only a payload whose digest matches, so a damaged file that torch could still
# unpickle (a flipped byte in a tensor) is not resumed from.
CHECKPOINT_MAGIC = b"semiprune-checkpoint "


# --- device and input -----------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a ConfigError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is visible", "set device to 'auto' or 'cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}", "use 'auto', 'cpu' or 'cuda'")
    return torch.device(device)


def to_float(x: Tensor) -> Tensor:
    """uint8 (B, C, H, W) 0..255 -> float32 in [-1, 1]: the model input convention. The product
    promotes to float32 as it reads the bytes (the same values as ``x.float() * (1 / 127.5)``, one
    pass over memory fewer)."""
    return x.mul(1 / 127.5).sub_(1.0)


def as_uint8_images(images: Tensor | np.ndarray, *, name: str = "images") -> Tensor:
    """Check and wrap a (N, C, H, W) uint8 array as a tensor (no copy unless numpy marks it read-only)."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch refuses to share read-only numpy memory without a warning
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"{name} must be a uint8 (N, C, H, W) array, got {t.dtype} {tuple(t.shape)}")
    return t


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX512-BF16; Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and ("amx_bf16" in flags or "avx512_bf16" in flags)


def resolve_precision(precision: str, device: str | torch.device = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``: ``torch.bfloat16``, or None for plain fp32.

    ``"auto"``: bf16 on CUDA GPUs that support it and on CPUs with native bf16 (:func:`cpu_has_native_bf16`),
    else fp32. ``"bf16"`` forces bf16 (slow where it is emulated), ``"fp32"`` forces fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- schedule ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Optimiser and schedule of one training run. Invalid values raise :class:`ConfigError`.

    epochs         number of passes over the objective's epoch (> 0)
    batch_size     batch size handed to the objective (FixMatch: the labeled batch B) (> 0)
    lr             peak learning rate (> 0); SGD, Nesterov momentum
    warmup         fraction of all steps over which lr rises linearly to ``lr``; then cosine to 0
    weight_decay   applied to conv/linear weights only (not to biases or BatchNorm)
    ema_decay      keep an exponential moving average of the weights (FixMatch: 0.999); None = off.
                   Step t uses min(ema_decay, (1 + t) / (10 + t)) (the usual warm-up), so a short run's
                   EMA follows the trained weights instead of staying near the initial ones.
    stop_after     train only the first ``stop_after`` epochs (None = all): the lr still follows the
                   ``epochs``-long schedule, so they are exactly the first epochs of a full run (what
                   early-epoch scores such as DUAL need, at a fraction of the cost)
    max_seconds    wall-clock guard: an epoch is not started when, at the pace of the slowest epoch so
                   far, it would end past the budget (the first epoch always runs). The lr schedule is *not*
                   rescaled, so a run that hits the guard ends un-annealed and is flagged
                   ``stopped_early``; size ``epochs`` to the budget and use this as a safety net.
    """

    epochs: int
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup: float = 0.0
    ema_decay: float | None = None
    stop_after: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        fix = "fix the training schedule"
        if not isinstance(self.epochs, int) or self.epochs <= 0:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs!r}", fix)
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}", fix)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}", fix)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}", fix)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0", "set momentum (e.g. 0.9) or nesterov: false")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}", fix)
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a fraction of all steps in [0, 1), got {self.warmup!r}", fix)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay!r}", fix)
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after <= 0):
            raise ConfigError(f"stop_after must be a positive integer or null, got {self.stop_after!r}", fix)
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0 or null, got {self.max_seconds!r}", fix)

    @property
    def train_epochs(self) -> int:
        """The epochs :func:`fit` trains: ``epochs``, or fewer with ``stop_after``."""
        return min(self.epochs, self.stop_after or self.epochs)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of 0-based ``step`` of ``total_steps``: linear warmup, then cosine to 0."""
        warm = int(self.warmup * total_steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- objectives --------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What :meth:`Objective.loss` returns for one batch.

    loss       scalar tensor to back-propagate
    n_samples  sample forward passes this step (labeled + unlabeled + extra views), for throughput
               and the ``sample_passes`` compute count
    indices    (B,) int64 sample ids of the samples whose training logits are reported, or None
    logits     (B, K) logits of those samples from *this* training forward (for hooks/train acc)
    targets    (B,) int64 their targets
    stats      extra scalars (floats or 0-d tensors) averaged over the epoch into the history,
               e.g. FixMatch's ``mask_rate``
    """

    loss: Tensor
    n_samples: int
    indices: Tensor | None = None
    logits: Tensor | None = None
    targets: Tensor | None = None
    stats: dict[str, Tensor | float] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """What :func:`fit` trains: the data, how an epoch is batched and augmented, and the loss.

    ``batches`` must draw all randomness from ``generator`` (seeded per epoch by the engine) so that
    runs are reproducible and resumable. An objective that keeps state across steps (e.g. FlexMatch's
    per-sample learning status) may also define ``state_dict()`` / ``load_state_dict(state)`` (plain
    tensors and values): :func:`fit` then stores that state in every checkpoint and restores it on
    resume. Hooks may do the same.
    """

    def to(self, device: torch.device) -> Objective:
        """Move the data to ``device`` once (return self)."""
        ...

    def steps_per_epoch(self, batch_size: int) -> int:
        ...

    def batches(self, epoch: int, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
        """Yield ``steps_per_epoch(batch_size)`` batches, already augmented, on the device."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> StepOutput:
        ...


@dataclass
class SupervisedBatch:
    rows: Tensor  # (B,) rows of the objective's arrays
    images: Tensor  # (B, C, H, W) uint8, augmented
    targets: Tensor  # (B,) int64


class SupervisedObjective:
    """Cross-entropy on labeled images: each sample exactly once per epoch, in seeded random order.

    images          (N, C, H, W) uint8
    targets         (N,) int class ids
    view            augmentation view (``none``, ``weak``, ``strong``), see :mod:`.augment`
    padding         pad-and-crop translation in pixels (default 12.5% of the side)
    sample_weights  (N,) float: each sample's loss is multiplied by its weight, then batch-averaged
    label_smoothing cross-entropy label smoothing
    ids             (N,) int64 ids reported to hooks (default: row numbers 0..N-1), e.g. pool indices
                    when training on a subset

    An epoch has ceil(N / batch_size) batches of near-equal size (no tiny last batch for BatchNorm).
    """

    def __init__(
        self,
        images: Tensor | np.ndarray,
        targets: Tensor | np.ndarray,
        *,
        view: str = "weak",
        padding: int | None = None,
        sample_weights: Tensor | np.ndarray | None = None,
        label_smoothing: float = 0.0,
        ids: Tensor | np.ndarray | None = None,
    ):
        self.images = as_uint8_images(images)
        n = self.images.shape[0]
        if n == 0:
            raise ValueError("SupervisedObjective needs at least one sample")
        self.targets = torch.as_tensor(targets).long()
        if self.targets.shape != (n,):
            raise ValueError(f"targets must have shape ({n},), got {tuple(self.targets.shape)}")
        if view not in VIEWS:
            raise ConfigError(f"unknown augmentation view {view!r}", f"use one of {', '.join(VIEWS)}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}", "fix the training config")
        self.view = view
        self.padding = padding
        self.label_smoothing = float(label_smoothing)
        self.sample_weights = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float32)
        if self.sample_weights is not None and self.sample_weights.shape != (n,):
            raise ValueError(f"sample_weights must have shape ({n},), got {tuple(self.sample_weights.shape)}")
        self.ids = torch.arange(n) if ids is None else torch.as_tensor(ids).long()
        if self.ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), got {tuple(self.ids.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> SupervisedObjective:
        self.images = self.images.to(device)
        self.targets = self.targets.to(device)
        self.ids = self.ids.to(device)
        if self.sample_weights is not None:
            self.sample_weights = self.sample_weights.to(device)
        return self

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def batches(self, epoch: int, batch_size: int, generator: torch.Generator) -> Iterator[SupervisedBatch]:
        perm = torch.randperm(len(self), generator=generator, device=self.images.device)
        for rows in perm.tensor_split(self.steps_per_epoch(batch_size)):
            # index_select, not images[rows]: the same rows, 10x faster on a CPU (8 against 100 us for 512 images)
            images = apply_view(self.images.index_select(0, rows), self.view, generator, padding=self.padding)
            yield SupervisedBatch(rows=rows, images=images, targets=self.targets[rows])

    def loss(self, model: nn.Module, batch: SupervisedBatch) -> StepOutput:
        logits = model(to_float(batch.images))
        if self.sample_weights is None:
            loss = F.cross_entropy(logits, batch.targets, label_smoothing=self.label_smoothing)
        else:
            per_sample = F.cross_entropy(logits, batch.targets, label_smoothing=self.label_smoothing, reduction="none")
            loss = (per_sample * self.sample_weights[batch.rows]).mean()
        return StepOutput(
            loss=loss, n_samples=len(batch.rows), indices=self.ids[batch.rows], logits=logits, targets=batch.targets
        )


# --- hooks -------------------------------------------------------------------------------------------


class Hook:
    """Base class with no-op methods; a hook may be any object with a subset of these methods.

    on_fit_start(start_epoch, model)              before training; ``start_epoch`` > 0 after a resume,
                                                  so a recorder can drop anything it kept for later epochs
                                                  (an epoch interrupted before its checkpoint runs again)
    on_batch_end(epoch, indices, logits, targets) after each optimiser step, with the sample ids (B,),
                                                  the detached logits (B, K) of the training forward and
                                                  the targets (B,), all on the device
    on_epoch_end(epoch, model)                    after each epoch, before its checkpoint; ``model`` is the
                                                  EMA model when EMA is on, else the trained model
                                                  (use :func:`predict`, which switches to eval mode)
    """

    def on_fit_start(self, start_epoch: int, model: nn.Module) -> None:
        pass

    def on_batch_end(self, epoch: int, indices: Tensor, logits: Tensor, targets: Tensor) -> None:
        pass

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        pass


def _hook_methods(hooks: Sequence[object], name: str) -> list:
    return [getattr(h, name) for h in hooks if callable(getattr(h, name, None))]


# --- checkpoints -------------------------------------------------------------------------------------


def _effective_key(run_key: str | None, schedule: Schedule, seed: int, model: nn.Module, objective: Objective,
                   amp: torch.dtype | None) -> str:
    """The caller's key plus everything the engine itself knows that must match to resume."""
    payload = {
        "run_key": run_key,
        "precision": precision_name(amp),
        "schedule": asdict(schedule),
        "seed": int(seed),
        "params": [[name, list(p.shape)] for name, p in model.state_dict().items()],
        "objective": type(objective).__qualname__,
        "steps_per_epoch": objective.steps_per_epoch(schedule.batch_size),
    }
    text = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(text, digest_size=16).hexdigest()


def _read_checkpoint(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    raw = path.read_bytes()
    header, _, payload = raw.partition(b"\n")
    if not header.startswith(CHECKPOINT_MAGIC) or hashlib.sha256(payload).hexdigest().encode() != header[len(CHECKPOINT_MAGIC):]:
        logger.warning("ignoring unreadable checkpoint %s (its SHA-256 does not match: damaged or not a checkpoint); "
                       "starting fresh", path)
        return None
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many types for a damaged file)
        logger.warning("ignoring unreadable checkpoint %s (%s: %s); starting fresh", path, type(err).__name__, err)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        logger.warning("ignoring checkpoint %s: not a format-%d engine checkpoint; starting fresh", path, CHECKPOINT_FORMAT)
        return None
    if state.get("run_key") != key:
        logger.warning("ignoring checkpoint %s: it belongs to a different run (config changed); starting fresh", path)
        return None
    return state


# --- results -----------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    model           the trained model (trained in place, on the device, train mode)
    ema_model       the EMA of the weights, or None; :attr:`final_model` picks it when present
    history         one dict per completed epoch: epoch, loss, acc, lr, seconds, img_per_s, + stats
    wall_seconds    wall time of this call
    train_seconds   training time summed over all epochs, including ones done before a resume
    sample_passes   sample forward passes in training over all epochs (counts unlabeled/strong views)
    start_epoch     first epoch this call trained (0 for a fresh run)
    resumed         whether a checkpoint was loaded
    precision       "bf16" or "fp32": what the forwards ran in
    stopped_early   the ``max_seconds`` guard ended the run before ``schedule.train_epochs``
    """

    model: nn.Module
    ema_model: nn.Module | None
    history: list[dict[str, float]]
    wall_seconds: float
    train_seconds: float
    sample_passes: int
    start_epoch: int
    resumed: bool
    stopped_early: bool
    precision: str = "fp32"

    @property
    def final_model(self) -> nn.Module:
        return self.ema_model if self.ema_model is not None else self.model

    @property
    def epochs_completed(self) -> int:
        return len(self.history)


# --- the loop ----------------------------------------------------------------------------------------


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for ema_buf, buf in zip(ema.buffers(), model.buffers()):
        ema_buf.copy_(buf)


def fit(
    model: nn.Module,
    objective: Objective,
    schedule: Schedule,
    *,
    seed: int,
    device: str | torch.device = "auto",
    precision: str = "auto",
    hooks: Sequence[object] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    run_key: str | None = None,
    keep_checkpoint: bool = False,
    channels_last: bool | None = None,
    compile: bool | str = False,
    progress: bool | None = None,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` (in place) on ``objective`` with ``schedule``.

    seed            seeds batch order and augmentation per epoch (initial weights are the caller's)
    device          "auto" | "cpu" | "cuda" | torch.device; the model and objective data move there once
    precision       "auto" | "fp32" | "bf16": the forward's autocast dtype (see :func:`resolve_precision`)
    hooks           objects with any of the :class:`Hook` methods, called in order
    checkpoint_dir  if set, the state after every epoch (model, optimizer, EMA, and the state of
                    an objective or hook that has ``state_dict``) is saved atomically to
                    ``checkpoint_dir/checkpoint.pt`` (plain state dicts, read back with
                    ``weights_only=True``), and a later call with the same ``run_key``,
                    schedule, seed, model shapes and objective size resumes from it, ending with the
                    same weights as an uninterrupted run. A damaged or foreign checkpoint is logged
                    and ignored. On success it is deleted unless ``keep_checkpoint`` (a kept
                    checkpoint of a finished run makes a repeated call return at once).
    run_key         a hash of the caller's config (data, model, objective options); required with
                    ``checkpoint_dir``
    channels_last   default: on for models with convolutions
    compile         compile the model's forward in place with ``torch.compile``: True, or a mode such as
                    "reduce-overhead" (CUDA graphs). State-dict keys and checkpoints are unchanged; the
                    EMA copy stays eager. Only reduce-overhead on a GPU has paid for these small models
                    (see README)
    progress        tqdm bar on stderr; default: only when stderr is a terminal. One INFO log line per
                    epoch is written either way.
    """
    if checkpoint_dir is not None and not run_key:
        raise ValueError("fit(checkpoint_dir=...) needs a run_key identifying the caller's config")
    t_call = time.perf_counter()
    device = resolve_device(device)
    amp = resolve_precision(precision, device)
    if channels_last is None:
        channels_last = _has_conv(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    objective = objective.to(device)
    steps_per_epoch = objective.steps_per_epoch(schedule.batch_size)
    total_steps = schedule.epochs * steps_per_epoch

    optimizer = SGD(_param_groups(model, schedule.weight_decay), lr=schedule.lr, momentum=schedule.momentum,
                    nesterov=schedule.nesterov)
    ema_model = None
    if schedule.ema_decay is not None:
        ema_model = copy.deepcopy(model).eval()
        ema_model.requires_grad_(False)
    if compile:
        model.compile(mode=None if compile is True else compile)

    history: list[dict[str, float]] = []
    start_epoch, sample_passes, train_seconds, resumed = 0, 0, 0.0, False
    ckpt_path = key = None
    parts = _stateful(model, optimizer, ema_model, objective, hooks)
    if checkpoint_dir is not None:
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        key = _effective_key(run_key, schedule, seed, model, objective, amp)
        state = _read_checkpoint(ckpt_path, key)
        restored = None if state is None else _restore(state, parts, ckpt_path)
        if restored is not None:
            start_epoch, history = restored["epoch"] + 1, restored["history"]
            sample_passes, train_seconds, resumed = restored["sample_passes"], restored["train_seconds"], True
            logger.info("%s: resuming from %s after epoch %d/%d", desc, ckpt_path, start_epoch, schedule.epochs)

    for on_fit_start in _hook_methods(hooks, "on_fit_start"):
        on_fit_start(start_epoch, model)
    batch_hooks = _hook_methods(hooks, "on_batch_end")
    epoch_hooks = _hook_methods(hooks, "on_epoch_end")

    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(
        total=schedule.train_epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=desc, unit="step",
        disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False,
    )
    step = start_epoch * steps_per_epoch
    stopped_early = False
    try:
        for epoch in range(start_epoch, schedule.train_epochs):
            if _over_budget(schedule, history, train_seconds):
                stopped_early = True
                logger.warning(
                    "%s: stopping after epoch %d/%d: the next epoch would end past max_seconds=%s "
                    "(lr schedule not annealed)", desc, epoch, schedule.epochs, schedule.max_seconds,
                )
                break
            t_epoch = time.perf_counter()
            model.train()
            generator = torch.Generator(device=device).manual_seed(stream_seed(seed, "epoch", epoch))
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            n_scored = n_passes = n_steps = 0
            stat_sums: dict[str, Tensor | float] = {}
            lr = schedule.lr
            for batch in objective.batches(epoch, schedule.batch_size, generator):
                lr = schedule.lr_at(step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with _autocast(device, amp):
                    out = objective.loss(model, batch)
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                if ema_model is not None:
                    _ema_update(ema_model, model, min(schedule.ema_decay, (1 + step) / (10 + step)))
                step += 1
                n_steps += 1
                if n_steps == 1:
                    halt_point(f"{desc}:epoch{epoch}")  # mid-epoch, past the last checkpoint
                n_passes += out.n_samples
                loss_sum += out.loss.detach().float()
                for name, value in out.stats.items():
                    stat_sums[name] = stat_sums.get(name, 0.0) + (value.detach().float() if isinstance(value, Tensor) else value)
                if out.logits is not None:
                    logits = out.logits.detach()
                    correct += (logits.argmax(1) == out.targets).sum()
                    n_scored += len(out.targets)
                    for on_batch_end in batch_hooks:
                        on_batch_end(epoch, out.indices, logits, out.targets)
                bar.update(1)
                if progress and n_steps % 25 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / n_steps:.3f}", refresh=False)
            if n_steps == 0:
                raise RuntimeError(f"{type(objective).__name__}.batches yielded no batch in epoch {epoch}")
            eval_model = ema_model if ema_model is not None else model
            for on_epoch_end in epoch_hooks:
                on_epoch_end(epoch, eval_model)
            seconds = time.perf_counter() - t_epoch
            train_seconds += seconds
            sample_passes += n_passes
            record = {
                "epoch": epoch,
                "loss": loss_sum.item() / n_steps,
                "acc": correct.item() / n_scored if n_scored else float("nan"),
                "lr": lr,
                "seconds": seconds,
                "img_per_s": n_passes / seconds,
                **{name: float(value) / n_steps for name, value in stat_sums.items()},
            }
            history.append(record)
            logger.info(
                "%s epoch %d/%d: loss %.4f acc %.4f lr %.4g | %.0f img/s %.1f s | elapsed %.1f s",
                desc, epoch + 1, schedule.epochs, record["loss"], record["acc"], lr,
                record["img_per_s"], seconds, train_seconds,
            )
            if ckpt_path is not None:
                progress_state = {"epoch": epoch, "history": history, "sample_passes": sample_passes, "train_seconds": train_seconds}
                _save_checkpoint(ckpt_path, key, parts, progress_state)
    finally:
        bar.close()

    if ckpt_path is not None and not keep_checkpoint:
        ckpt_path.unlink(missing_ok=True)
    return FitResult(
        model=model,
        ema_model=ema_model,
        history=history,
        wall_seconds=time.perf_counter() - t_call,
        train_seconds=train_seconds,
        sample_passes=sample_passes,
        start_epoch=start_epoch,
        resumed=resumed,
        stopped_early=stopped_early,
        precision=precision_name(amp),
    )


def _over_budget(schedule: Schedule, history: list[dict], train_seconds: float) -> bool:
    if schedule.max_seconds is None or not history:
        return False
    slowest = max(h["seconds"] for h in history)  # the slowest so far: timings on shared machines jump
    return train_seconds + slowest > schedule.max_seconds


def _stateful(model, optimizer, ema_model, objective, hooks) -> dict[str, Any]:
    """Everything whose state a checkpoint holds, by name; objectives and hooks take part when
    they have ``state_dict``/``load_state_dict`` (e.g. FlexMatch's per-sample learning status)."""
    parts: dict[str, Any] = {"model": model, "optimizer": optimizer}
    if ema_model is not None:
        parts["ema"] = ema_model
    candidates = [("objective", objective)] + [(f"hook{i}", h) for i, h in enumerate(hooks)]
    for name, obj in candidates:
        if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            parts[name] = obj
    return parts


def _save_checkpoint(path: Path, key: str, parts: dict[str, Any], progress: dict[str, Any]) -> None:
    state = {"format": CHECKPOINT_FORMAT, "run_key": key, **progress,
             "state": {name: obj.state_dict() for name, obj in parts.items()}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def _restore(state: dict, parts: dict[str, Any], path: Path) -> dict | None:
    """Load a checkpoint into the live objects and return its bookkeeping; on any mismatch put the
    fresh state back, log, and return None (start fresh)."""
    fresh = {name: copy.deepcopy(obj.state_dict()) for name, obj in parts.items()}
    try:
        progress = {
            "epoch": int(state["epoch"]),
            "history": [dict(h) for h in state["history"]],
            "sample_passes": int(state["sample_passes"]),
            "train_seconds": float(state["train_seconds"]),
        }
        saved = state["state"]
        if set(saved) != set(parts):
            raise KeyError(f"checkpoint holds {sorted(saved)}, this run has {sorted(parts)}")
        for name, obj in parts.items():
            obj.load_state_dict(saved[name])
        return progress
    except Exception as err:  # noqa: BLE001  (missing keys, wrong shapes, wrong types)
        logger.warning("ignoring checkpoint %s: its state does not fit (%s: %s); starting fresh", path, type(err).__name__, err)
        for name, obj in parts.items():
            obj.load_state_dict(fresh[name])
        return None


# --- inference ---------------------------------------------------------------------------------------

# On a CPU, inference batches whose largest activation stays within this many bytes. Bigger ones ran
# slower: their activations leave the caches, and glibc serves blocks above 32 MiB by mmap whatever
# the settings (semiprune_core.allocator), page-faulted afresh each time (turning mmap off recovered
# only part of it). Measured on 2 Sapphire Rapids cores in bf16: fastcnn_l 42,000 img/s at batch
# 256-512 vs 32,700 at 1024; resnet18_cifar 960-1,000 at 64-256 vs 530 at 1024; identical outputs.
CPU_ACTIVATION_BUDGET = 16 << 20


def _largest_activation_per_sample(model: nn.Module, forward, x: Tensor, device: torch.device,
                                   amp: torch.dtype | None) -> int:
    """Bytes of the largest tensor that a forward of the one sample ``x`` makes, ``x`` included."""
    sizes = [x.nbytes]

    def record(_module, _args, out) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.nbytes)

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with _autocast(device, amp):
            forward(x)
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor | np.ndarray,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    precision: str = "auto",
    output: str = "logits",
) -> Tensor:
    """Batched inference in eval mode without augmentation (the model's mode is restored after).

    images  (N, C, H, W) uint8
    output  "logits" -> (N, K), "probs" -> (N, K) softmax, "features" -> (N, F) from ``model.features``
    device  where to run (default: the model's device; the model is moved there)
    precision  "auto" | "fp32" | "bf16" (see :func:`resolve_precision`); outputs are float32 either way
    Returns a float32 CPU tensor. A model with convolutions is put in channels_last, as :func:`fit`
    does: one loaded from a file is not, and ran 4-5x slower on a CPU (``fastcnn``: 12,000 vs
    54,000 img/s on 2 cores). On a CPU ``batch_size`` is an upper bound: batches shrink until their
    largest activation fits :data:`CPU_ACTIVATION_BUDGET` (``fastcnn_l`` on 28x28: 334).
    """
    if output not in ("logits", "probs", "features"):
        raise ValueError(f"output must be 'logits', 'probs' or 'features', got {output!r}")
    images = as_uint8_images(images)
    device = _model_device(model) if device is None else resolve_device(device)
    amp = resolve_precision(precision, device)
    model.to(device)
    if _has_conv(model):
        model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    forward = model.features if output == "features" else model
    chunks = []
    try:
        if device.type == "cpu" and images.shape[0] > 0:
            per_sample = _largest_activation_per_sample(model, forward, to_float(images[:1]), device, amp)
            batch_size = max(1, min(batch_size, CPU_ACTIVATION_BUDGET // per_sample))
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
            with _autocast(device, amp):
                y = forward(x)
            y = y.float()
            if output == "probs":
                y = y.softmax(1)
            chunks.append(y.cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def evaluate(
    model: nn.Module,
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> float:
    """Top-1 accuracy of ``model`` on uint8 ``images`` (N, C, H, W) with ``labels`` (N,)."""
    logits = predict(model, images, batch_size=batch_size, device=device, precision=precision)
    labels = torch.as_tensor(labels).long().cpu()
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
