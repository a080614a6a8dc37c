"""Benchmark variants: seeded, pure transformations of a :class:`Pool` (Pool in, new Pool out).

Each appends a record of itself to ``info["variants"]``. Stratification uses
:meth:`Pool.reference_labels` (hidden true labels for benchmarks, human labels for real pools).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import DataError
from ..seeding import rng
from .pool import Pool

CORRUPTIONS = ("noise", "blur", "occlusion", "contrast")
# Strength per severity 1..5 (index 0 = severity 1), in the spirit of CIFAR-10-C.
_NOISE_STD = (0.04, 0.08, 0.12, 0.18, 0.26)  # share of the 0..255 range
_BLUR_SIGMA = (0.5, 0.75, 1.0, 1.5, 2.0)  # pixels at <= 32 px; scaled up for larger images
_OCCLUSION_SIDE = (0.15, 0.2, 0.25, 0.3, 0.4)  # rectangle side as a share of the image side
_CONTRAST = (0.6, 0.5, 0.4, 0.3, 0.2)  # kept share of the deviation from the image mean


def _recorded(pool: Pool, record: dict, **changes) -> Pool:
    info = {**pool.info, "variants": [*pool.info.get("variants", []), record]}
    return replace(pool, info=info, **changes)


def stratified_choice(strata: np.ndarray, n: int, g: np.random.Generator) -> np.ndarray:
    """Positions of ``n`` of the rows, proportionally allocated over ``strata`` (N,) int, in row order.

    Each stratum gets floor(n * share); the leftover rows go to the strata with the largest
    remainders (ties broken at random). Inside a stratum the rows are drawn at random.
    """
    values, inverse, sizes = np.unique(strata, return_inverse=True, return_counts=True)
    quota, remainder = np.divmod(n * sizes, len(strata))
    order = np.lexsort((g.random(len(values)), -remainder))
    quota[order[: n - quota.sum()]] += 1
    keep = np.zeros(len(strata), bool)
    for s in range(len(values)):
        members = np.flatnonzero(inverse == s)
        keep[g.choice(members, size=quota[s], replace=False)] = True
    return np.flatnonzero(keep)


def subsample(pool: Pool, *, n_train: int | None = None, n_test: int | None = None, seed: int) -> Pool:
    """Keep ``n_train`` train and ``n_test`` test rows (None = all of that split), stratified by the
    reference labels (unlabeled rows, -1, are a stratum of their own), in their original order.
    """
    ref = pool.reference_labels()
    keep = np.ones(len(pool), bool)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = np.flatnonzero(pool.split == split)
        if n is None:
            continue
        if n > len(rows):
            raise DataError(f"subsample asks for {n} {split} samples but the pool has {len(rows)}",
                            f"lower data.subsample.{split} to at most {len(rows)} (or null for all)")
        keep[rows] = False
        keep[rows[stratified_choice(ref[rows], n, rng(seed, "subsample", split))]] = True
    if keep.all():
        return pool
    return _recorded(pool.take(keep), {"name": "subsample", "train": n_train, "test": n_test})


def long_tail_counts(class_sizes: np.ndarray, *, imbalance: float) -> np.ndarray:
    """Per-class sizes after the exponential long-tail profile. (C,) int -> (C,) int.

    Class c keeps min(its size, floor(n_max * imbalance ** (c / (C - 1)))), at least 1, with n_max
    the largest class size: class 0 is the head, class C-1 the tail (as in long-tailed CIFAR).
    """
    sizes = np.asarray(class_sizes)
    c = len(sizes)
    if c < 2:
        return sizes.copy()
    target = np.floor(sizes.max() * imbalance ** (np.arange(c) / (c - 1)) + 1e-9).astype(int)
    return np.minimum(sizes, np.maximum(target, 1))


def long_tail(pool: Pool, *, imbalance: float, seed: int) -> Pool:
    """Make the train split long-tailed (see :func:`long_tail_counts`); the test split is untouched.

    Needs a reference label on every train row: a long tail over unknown classes means nothing.
    imbalance = 1 returns the pool unchanged.
    """
    if not 0 < imbalance <= 1:
        raise DataError(f"long_tail imbalance {imbalance} is outside (0, 1]", "use e.g. 0.01, 0.1, or 1 for off")
    if imbalance == 1:
        return pool
    ref = pool.reference_labels()
    train = np.flatnonzero(pool.split == "train")
    if (ref[train] < 0).any():
        raise DataError("long_tail needs a label on every train sample, and this pool has unlabeled ones",
                        "use long_tail only with benchmark sources or fully labeled class folders")
    sizes = np.bincount(ref[train], minlength=len(pool.classes))
    counts = long_tail_counts(sizes, imbalance=imbalance)
    g = rng(seed, "long_tail")
    keep = np.ones(len(pool), bool)
    keep[train] = False
    for c, k in enumerate(counts):
        members = train[ref[train] == c]
        keep[g.choice(members, size=k, replace=False)] = True
    return _recorded(pool.take(keep), {"name": "long_tail", "imbalance": imbalance,
                                       "class_counts": counts.tolist()})


def corrupt(pool: Pool, *, share: float, kinds: list[str] | tuple[str, ...] = CORRUPTIONS, severity: int = 3,
            seed: int) -> Pool:
    """Corrupt a ``share`` of the train rows, each with one of ``kinds`` (assigned evenly at random).

    Adds visible flags ``is_corrupted`` (N,) bool and ``corruption`` (N,) str ("" when clean). Rows
    already corrupted by an earlier call keep their flags. share = 0 returns the pool unchanged.
    """
    unknown = sorted(set(kinds) - set(CORRUPTIONS))
    if unknown:
        raise DataError(f"unknown corruption {unknown[0]!r}", f"use some of {', '.join(CORRUPTIONS)}")
    if not 0 <= share <= 1:
        raise DataError(f"corrupt share {share} is outside [0, 1]", "use e.g. 0.2")
    if not 1 <= severity <= 5:
        raise DataError(f"corrupt severity {severity} is outside 1..5", "use 1 (mild) to 5 (strong)")
    train = np.flatnonzero(pool.split == "train")
    m = round(share * len(train))
    if m == 0:
        return pool
    if not kinds:
        raise DataError("corrupt has no kinds to apply", f"name at least one of {', '.join(CORRUPTIONS)}")
    g = rng(seed, "corrupt")
    chosen = np.sort(g.choice(train, size=m, replace=False))
    kind_of = g.permutation(np.resize(np.arange(len(kinds)), m))

    images = pool.images.copy()
    for k, kind in enumerate(kinds):
        rows = chosen[kind_of == k]
        if len(rows):
            images[rows] = _CORRUPT[kind](pool.images[rows], severity=severity, g=rng(seed, "corrupt", kind))
    flags = dict(pool.flags)
    is_corrupted = flags.get("is_corrupted", np.zeros(len(pool), bool)).copy()
    corruption = flags.get("corruption", np.full(len(pool), "", dtype=object)).astype(object)
    is_corrupted[chosen] = True
    corruption[chosen] = np.asarray(kinds, dtype=object)[kind_of]
    flags["is_corrupted"] = is_corrupted
    flags["corruption"] = corruption.astype(str)
    return _recorded(pool, {"name": "corrupt", "share": share, "kinds": list(kinds), "severity": severity,
                            "count": int(m)}, images=images, flags=flags)


# Each corruption: uint8 (m, C, H, W) -> uint8 (m, C, H, W), vectorised over the batch.


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _noise(x: np.ndarray, *, severity: int, g: np.random.Generator) -> np.ndarray:
    return _to_uint8(x + g.normal(0, 255 * _NOISE_STD[severity - 1], size=x.shape))


def _blur(x: np.ndarray, *, severity: int, g: np.random.Generator) -> np.ndarray:
    sigma = _BLUR_SIGMA[severity - 1] * max(1.0, x.shape[-1] / 32)
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = x.astype(np.float32)
    for axis in (2, 3):  # separable Gaussian, edges reflected
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        n = out.shape[axis]
        out = sum(w * padded.take(np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return _to_uint8(out)


def _occlusion(x: np.ndarray, *, severity: int, g: np.random.Generator) -> np.ndarray:
    m, _, h, w = x.shape
    side = _OCCLUSION_SIDE[severity - 1]
    rh, rw = max(1, round(side * h)), max(1, round(side * w))
    top = g.integers(0, h - rh + 1, size=m)
    left = g.integers(0, w - rw + 1, size=m)
    fill = g.integers(0, 256, size=(m, 1, 1, 1)).astype(np.uint8)
    rows = (np.arange(h)[None, :] >= top[:, None]) & (np.arange(h)[None, :] < (top + rh)[:, None])
    cols = (np.arange(w)[None, :] >= left[:, None]) & (np.arange(w)[None, :] < (left + rw)[:, None])
    mask = rows[:, None, :, None] & cols[:, None, None, :]
    return np.where(mask, fill, x)


def _contrast(x: np.ndarray, *, severity: int, g: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + (x - mean) * _CONTRAST[severity - 1])


_CORRUPT = {"noise": _noise, "blur": _blur, "occlusion": _occlusion, "contrast": _contrast}
