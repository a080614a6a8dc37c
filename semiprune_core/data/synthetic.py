"""A seeded synthetic benchmark with known structure: prototypes, ambiguous blends, wrong labels.

Each class has a smooth random prototype (a coarse Gaussian grid, bilinearly upsampled, zero mean,
unit spread). A sample is its class prototype, shifted by a few pixels, with random contrast and
brightness, plus pixel noise. ``separation`` scales the prototypes against the fixed noise, so it
sets how far apart the classes are. An ``ambiguous_share`` of samples (both splits) blend their
class prototype with another one (hidden ``is_ambiguous``); a ``mislabeled_share`` of train samples
carry a wrong dataset label (hidden ``is_mislabeled``; hidden ``clean_label`` = generating class).
``true_labels`` is the dataset label, noisy where mislabeled: it is what an annotator's dataset says.

Same arguments -> byte-identical pool. Prototypes, train samples and test samples use separate
random streams, so changing ``n_test`` leaves the train split unchanged.
"""

from __future__ import annotations

import numpy as np

from ..seeding import rng
from ._common import benchmark_pool
from .pool import Pool

_GRID = 5  # prototype detail: a 5x5 grid of random values per channel, smoothly upsampled
_SIGNAL = 16.0  # prototype amplitude (grey levels) at separation 1; a linear model gets ~96% at defaults
_NOISE = 48.0  # pixel noise standard deviation (grey levels)
_BLEND = (0.5, 0.65)  # weight an ambiguous sample gives its own class


def make_synthetic(*, seed: int, n_train: int = 4000, n_test: int = 1000, n_classes: int = 10, image_size: int = 28,
                   channels: int = 1, separation: float = 1.0, ambiguous_share: float = 0.1,
                   mislabeled_share: float = 0.05) -> Pool:
    """A benchmark :class:`Pool` with images (n_train + n_test, channels, image_size, image_size) uint8."""
    protos = _prototypes(rng(seed, "synthetic", "prototypes"), n_classes, channels, image_size)
    train_x, train_clean, train_amb = _samples(rng(seed, "synthetic", "train"), protos, n_train, ambiguous_share,
                                               separation)
    test_x, test_y, test_amb = _samples(rng(seed, "synthetic", "test"), protos, n_test, ambiguous_share, separation)

    g = rng(seed, "synthetic", "mislabel")
    wrong = np.zeros(n_train, bool)
    wrong[g.choice(n_train, size=round(mislabeled_share * n_train), replace=False)] = True
    train_y = train_clean.copy()
    train_y[wrong] = (train_clean[wrong] + g.integers(1, n_classes, size=int(wrong.sum()))) % n_classes

    width = len(str(n_classes - 1))
    return benchmark_pool(
        train_x, train_y, test_x, test_y,
        classes=[f"class_{c:0{width}d}" for c in range(n_classes)],
        hidden={
            "is_ambiguous": np.concatenate([train_amb, test_amb]),
            "is_mislabeled": np.concatenate([wrong, np.zeros(n_test, bool)]),
            "clean_label": np.concatenate([train_clean, test_y]),
        },
        info={"source": "synthetic", "synthetic": {
            "seed": seed, "n_train": n_train, "n_test": n_test, "n_classes": n_classes, "image_size": image_size,
            "channels": channels, "separation": separation, "ambiguous_share": ambiguous_share,
            "mislabeled_share": mislabeled_share,
        }},
    )


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights mapping a coarse axis onto a fine one."""
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _prototypes(g: np.random.Generator, n_classes: int, channels: int, size: int) -> np.ndarray:
    """(n_classes, channels, size, size) float, each class zero-mean with unit standard deviation."""
    up = _upsample_matrix(_GRID, size)
    protos = up @ g.standard_normal((n_classes, channels, _GRID, _GRID)) @ up.T
    protos -= protos.mean(axis=(1, 2, 3), keepdims=True)
    protos /= protos.std(axis=(1, 2, 3), keepdims=True)
    return protos


def _samples(g: np.random.Generator, protos: np.ndarray, n: int, ambiguous_share: float, separation: float):
    """n samples, balanced over classes: images (n, C, S, S) uint8, classes (n,) int64, is_ambiguous (n,) bool."""
    k, ch, size, _ = protos.shape
    y = g.permutation(np.arange(n) % k).astype(np.int64)
    amb = np.zeros(n, bool)
    amb[g.choice(n, size=round(ambiguous_share * n), replace=False)] = True
    other = (y + g.integers(1, k, size=n)) % k
    w = np.where(amb, g.uniform(*_BLEND, size=n), 1.0)[:, None, None, None]
    signal = w * protos[y] + (1 - w) * protos[other]

    max_shift = max(1, round(size * 0.07))
    dy, dx = g.integers(-max_shift, max_shift + 1, size=(2, n))
    axis = np.arange(size)
    rows = np.clip(axis[None, :] - dy[:, None], 0, size - 1)
    cols = np.clip(axis[None, :] - dx[:, None], 0, size - 1)
    signal = signal[np.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].transpose(0, 3, 1, 2)

    contrast = g.uniform(0.8, 1.2, size=(n, 1, 1, 1))
    brightness = g.normal(0, 8, size=(n, 1, 1, 1))
    x = 128 + brightness + contrast * _SIGNAL * separation * signal + _NOISE * g.standard_normal(signal.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y, amb
