"""The engine hook that records one proxy model's per-sample training dynamics, epoch by epoch.

UNSEEN single-step scoring trains one proxy per fold: proxy ``k`` trains on every fold but ``k``.
:class:`DynamicsRecorder` records, for every epoch,
  - the *in-sample* statistics of every training sample, taken from the logits of the engine's own
    training forward (``on_batch_end``: no extra forward pass; train mode, augmented views), and
  - the *out-of-sample* statistics of the held-out fold, from an eval-mode forward without
    augmentation at the end of the epoch (``on_epoch_end``; the EMA model when EMA is on).

Storage: the current epoch lives in a small (N, M) float32 buffer on the training device (filled
without host synchronisation); at each epoch end it is written as float16 into a memory-mapped
``.npy`` file of shape (epochs, N, M) in ``scratch_dir`` and flushed. Nothing of size
N x epochs x classes is ever held in memory. :meth:`DynamicsRecorder.write_parquet` turns the file
into the dynamics table (see :mod:`.store`) a chunk of samples at a time.

Resume: the recorder is a stateful hook (``state_dict``/``load_state_dict``), so the engine saves
its state in every per-epoch checkpoint: the scratch file's random token and a BLAKE2 digest of each
completed epoch's slice. When the engine resumes, ``load_state_dict`` checks that the scratch file is
the one the checkpoint describes (same run key, token, shape and digests); if not, it raises, and the
engine ignores the whole checkpoint and starts fresh (it logs why), so model and dynamics never
disagree. Epochs after the checkpoint are simply recorded again.

Usage (the score@fold stage, fold ``k`` of ``folds = assign_folds(targets, k=K, seed=...)``)::

    train, held = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    scratch = ctx.scratch / f"fold_{k}"          # one dir per fold: the engine's checkpoint name is fixed
    rec = DynamicsRecorder(len(targets), schedule.epochs, oos_rows=held, oos_images=images[held],
                           oos_targets=targets[held], scratch_dir=scratch, run_key=run_key)
    fit(model, SupervisedObjective(images[train], targets[train], ids=train), schedule, seed=seed,
        hooks=[rec], checkpoint_dir=scratch, run_key=run_key, keep_checkpoint=True)
    rec.write_parquet(f"artifacts/dynamics/fold_{k}.parquet", sample_ids, fold=folds,
                      meta={"held_out_fold": k, ...})
    rec.cleanup()                                # then delete the checkpoint too

``run_key`` must change with anything that changes the dynamics (params, data, fold assignment, k).
``keep_checkpoint=True`` lets a rerun after a crash between ``fit`` and ``write_parquet`` skip
training (a kept checkpoint of a finished run resumes at the end).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DataError
from ..io import write_json
from ..training.engine import predict
from .stats import METRICS, per_sample_stats
from .store import DEFAULT_CHUNK_ROWS, to_float16, write_dynamics

logger = logging.getLogger(__name__)

SCRATCH_FORMAT = 1


class DynamicsRecorder:
    """Engine hook: per-sample, per-epoch dynamics of one proxy model, streamed to ``scratch_dir``.

    n_samples     N, the pool size; sample rows are 0..N-1 (train with ``SupervisedObjective(..., ids=rows)``
                  so the engine reports pool rows)
    epochs        the schedule's epoch count E
    oos_rows      (N_oos,) int rows of the held-out fold; every other row must be trained on exactly once
                  per epoch (checked at each epoch end: a held-out row seen in training is a leak, an error)
    oos_images    (N_oos, C, H, W) uint8 images of those rows (same order), evaluated each epoch end
    oos_targets   (N_oos,) int their target labels
    scratch_dir   where the (E, N, 6) float16 memmap lives (about 12 bytes per sample-epoch); use the
                  stage's ignored scratch dir, e.g. the engine's ``checkpoint_dir``
    run_key       identifies the caller's config (pass the same key as to ``fit``); the scratch file is
                  named by a hash of it, N, E and the held-out rows, so different folds/configs never collide
    eval_batch_size  batch size of the out-of-sample forward
    precision     autocast of the out-of-sample forward (``"auto"``, ``"fp32"``, ``"bf16"``; pass fit's)
    """

    def __init__(
        self,
        n_samples: int,
        epochs: int,
        *,
        oos_rows: np.ndarray,
        oos_images: Tensor | np.ndarray,
        oos_targets: Tensor | np.ndarray,
        scratch_dir: str | os.PathLike,
        run_key: str,
        eval_batch_size: int = 1024,
        precision: str = "auto",
    ):
        if n_samples <= 0 or epochs <= 0:
            raise ValueError(f"n_samples and epochs must be positive, got {n_samples} and {epochs}")
        if not run_key:
            raise ValueError("DynamicsRecorder needs a run_key identifying the caller's config")
        self.n_samples, self.epochs = int(n_samples), int(epochs)
        self.oos_rows = np.asarray(oos_rows, dtype=np.int64)
        if self.oos_rows.ndim != 1 or len(np.unique(self.oos_rows)) != len(self.oos_rows):
            raise ValueError("oos_rows must be a 1-D array of distinct row ids")
        if len(self.oos_rows) and (self.oos_rows.min() < 0 or self.oos_rows.max() >= self.n_samples):
            raise ValueError(f"oos_rows must lie in 0..{self.n_samples - 1}")
        self.oos_images = oos_images
        self.oos_targets = torch.as_tensor(np.asarray(oos_targets)).long()
        if len(oos_images) != len(self.oos_rows) or self.oos_targets.shape != (len(self.oos_rows),):
            raise ValueError(f"oos_images and oos_targets need one entry per oos row ({len(self.oos_rows)}), "
                             f"got {len(oos_images)} and {tuple(self.oos_targets.shape)}")
        self.is_oos = np.zeros(self.n_samples, bool)
        self.is_oos[self.oos_rows] = True
        self.eval_batch_size = int(eval_batch_size)
        self.precision = precision

        ident = {
            "format": SCRATCH_FORMAT, "run_key": str(run_key), "n_samples": self.n_samples, "epochs": self.epochs,
            "metrics": list(METRICS),
            "oos": hashlib.blake2b(self.oos_rows.tobytes() + self.oos_targets.numpy().tobytes(), digest_size=16).hexdigest(),
        }
        self.key = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=16).hexdigest()
        self.scratch_dir = Path(scratch_dir)
        self.path = self.scratch_dir / f"dynamics-{self.key}.npy"
        self.header_path = self.path.with_suffix(".json")
        self.shape = (self.epochs, self.n_samples, len(METRICS))

        self._token = ""
        self._completed = np.zeros(self.epochs, bool)
        self._digests = [""] * self.epochs
        self._mm: np.memmap | None = None
        self._buf: Tensor | None = None
        self._counts: Tensor | None = None
        self._epoch: int | None = None

    # --- state saved in the engine's checkpoints ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "token": self._token, "completed": torch.from_numpy(self._completed.copy()),
                "digests": list(self._digests)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Adopt a checkpoint's state; raises ``ValueError`` when the scratch file does not match it (the
        engine then ignores the checkpoint and starts fresh)."""
        completed = np.asarray(state["completed"], dtype=bool)
        if completed.shape != (self.epochs,):
            raise ValueError(f"the checkpoint records {completed.shape} epochs of dynamics, this run has {self.epochs}")
        if not completed.any():  # nothing on disk to trust: a fresh start
            self._reset()
            return
        if state["key"] != self.key:
            raise ValueError("the checkpoint's dynamics belong to a different run (config, fold or pool changed)")
        mm = self._open_existing(state["token"])
        digests = [str(d) for d in state["digests"]]
        for e in np.flatnonzero(completed):
            if _digest(mm[e]) != digests[e]:
                raise ValueError(f"dynamics of epoch {e} in {self.path} differ from those the checkpoint saw")
        self._token, self._completed, self._digests, self._mm = str(state["token"]), completed.copy(), digests, mm

    def _open_existing(self, token: str) -> np.memmap:
        if not self.path.exists() or not self.header_path.exists():
            raise ValueError(f"the dynamics scratch file {self.path} (or its header) is missing")
        header = json.loads(self.header_path.read_text())
        if header.get("token") != token or header.get("key") != self.key:
            raise ValueError(f"{self.path} was created by another run than the checkpoint's")
        mm = np.lib.format.open_memmap(self.path, mode="r+")
        if mm.shape != self.shape or mm.dtype != np.float16:
            raise ValueError(f"{self.path} holds {mm.dtype} {mm.shape}, expected float16 {self.shape}")
        return mm

    def _reset(self) -> None:
        self._token, self._mm = "", None
        self._completed[:] = False
        self._digests = [""] * self.epochs

    def _create(self) -> None:
        self._reset()
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self.header_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self._mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=self.shape)
        self._token = secrets.token_hex(16)
        write_json(self.header_path, {"key": self.key, "token": self._token, "shape": list(self.shape),
                                      "dtype": "float16", "metrics": list(METRICS)})

    # --- engine hook ------------------------------------------------------------------------------------

    def on_fit_start(self, start_epoch: int, model: nn.Module) -> None:
        if start_epoch == 0:
            self._create()
        else:
            done = self._completed[: min(start_epoch, self.epochs)]
            if self._mm is None or not done.all():
                raise DataError(f"cannot resume recording dynamics at epoch {start_epoch + 1}: the earlier epochs are "
                                f"not in {self.path}", "delete the stage's scratch dir (checkpoint) and re-run")
            self._completed[start_epoch:] = False  # an epoch interrupted before its checkpoint runs again
            for e in range(start_epoch, self.epochs):
                self._digests[e] = ""
            logger.info("dynamics: resuming at epoch %d/%d from %s", start_epoch + 1, self.epochs, self.path)
        device = next(model.parameters()).device
        self._buf = torch.full((self.n_samples, len(METRICS)), float("nan"), device=device)
        self._counts = torch.zeros(self.n_samples, dtype=torch.int32, device=device)
        self._epoch = None

    def on_batch_end(self, epoch: int, indices: Tensor | None, logits: Tensor, targets: Tensor) -> None:
        if self._buf is None:
            raise RuntimeError("DynamicsRecorder: on_fit_start was not called")
        if indices is None:
            raise ValueError("DynamicsRecorder needs the sample ids of each batch (the objective reported none)")
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            raise RuntimeError(f"DynamicsRecorder: epoch {self._epoch} ended without on_epoch_end")
        stats = per_sample_stats(logits, targets)
        idx = indices.to(self._buf.device, torch.long)
        self._buf[idx] = torch.stack([stats[m].float() for m in METRICS], 1).to(self._buf.device)
        self._counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        if self._mm is None or self._buf is None:
            raise RuntimeError("DynamicsRecorder: on_fit_start was not called")
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch {epoch} is outside the recorder's 0..{self.epochs - 1}")
        counts = self._counts.cpu().numpy()
        leaked = np.flatnonzero(self.is_oos & (counts > 0))
        if len(leaked):
            raise DataError(f"{len(leaked)} held-out sample(s) (first: row {leaked[0]}) were trained on in epoch {epoch + 1}",
                            "train the fold's proxy only on the other folds")
        wrong = np.flatnonzero(~self.is_oos & (counts != 1))
        if len(wrong):
            raise DataError(f"{len(wrong)} training sample(s) (first: row {wrong[0]}, seen {counts[wrong[0]]} times) were "
                            f"not trained on exactly once in epoch {epoch + 1}",
                            "use an objective that reports every non-held-out row once per epoch (SupervisedObjective ids=rows)")
        values = self._buf.cpu().numpy()
        if len(self.oos_rows):
            values[self.oos_rows] = self._out_of_sample(model)
        self._mm[epoch] = to_float16(values)
        self._mm.flush()
        self._digests[epoch] = _digest(self._mm[epoch])
        self._completed[epoch] = True
        self._buf.fill_(float("nan"))
        self._counts.zero_()
        self._epoch = None

    def _out_of_sample(self, model: nn.Module) -> np.ndarray:
        """(N_oos, M) statistics of the held-out fold: eval mode, no augmentation."""
        logits = predict(model, self.oos_images, batch_size=self.eval_batch_size, precision=self.precision)
        out = np.empty((len(self.oos_rows), len(METRICS)), np.float32)
        for start in range(0, len(out), 65_536):
            stats = per_sample_stats(logits[start : start + 65_536], self.oos_targets[start : start + 65_536])
            out[start : start + 65_536] = torch.stack([stats[m].float() for m in METRICS], 1).numpy()
        return out

    # --- results ---------------------------------------------------------------------------------------

    @property
    def epochs_recorded(self) -> int:
        """Completed epochs from epoch 0 on (fewer than ``epochs`` when the engine stopped early)."""
        missing = np.flatnonzero(~self._completed)
        return int(missing[0]) if len(missing) else self.epochs

    def trajectories(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The recorded epochs of ``rows`` as (len(rows), E) arrays by metric, for :func:`compute_scores`."""
        e = self.epochs_recorded
        if self._mm is None or e == 0:
            raise DataError("no epoch of dynamics was recorded", "train the proxy with this recorder as a hook first")
        block = np.asarray(self._mm[:e][:, np.asarray(rows, np.int64)], dtype=np.float32)  # (E, R, M)
        return {name: np.ascontiguousarray(block[:, :, i].T) for i, name in enumerate(METRICS)}

    def write_parquet(
        self,
        path: str | os.PathLike,
        sample_ids: np.ndarray,
        *,
        fold: np.ndarray,
        is_oos: np.ndarray | None = None,
        meta: Mapping[str, Any] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        """Write the recorded epochs as the dynamics table (see :mod:`.store`), atomically, in chunks.

        sample_ids  (N,) str, row n's id
        fold        (N,) int, every sample's fold
        is_oos      (N,) bool; default (and required value): this recorder's held-out rows
        meta        extra JSON metadata (the stage passes e.g. ``held_out_fold`` and its params)
        """
        e = self.epochs_recorded
        if self._mm is None or e == 0:
            raise DataError("no epoch of dynamics was recorded", "train the proxy with this recorder as a hook first")
        if is_oos is not None and not np.array_equal(np.asarray(is_oos, bool), self.is_oos):
            raise ValueError("is_oos differs from the recorder's held-out rows")
        if e < self.epochs:
            logger.warning("dynamics: writing %d of %d planned epochs (training stopped early)", e, self.epochs)
        info = {**(meta or {}), "epochs_planned": self.epochs, "n_oos": int(self.is_oos.sum())}
        write_dynamics(path, sample_ids, fold=fold, is_oos=self.is_oos, values=self._mm[:e], meta=info,
                       chunk_rows=chunk_rows)

    def cleanup(self) -> None:
        """Delete the scratch file (after :meth:`write_parquet`)."""
        self._mm = None
        self.path.unlink(missing_ok=True)
        self.header_path.unlink(missing_ok=True)


def _digest(block: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(block)).cast("B"), digest_size=16).hexdigest()
