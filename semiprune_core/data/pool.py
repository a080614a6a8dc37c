"""The in-memory form of a dataset: what every source returns and every variant transforms."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

UNLABELED = -1


@dataclass(frozen=True)
class Pool:
    """All samples of a dataset, both splits, as aligned arrays.

    Shapes (N samples, C channels, H x W pixels):
      sample_ids  (N,) str     stable, unique: ``train/000123`` for indexed sources, the relative path for folders
      split       (N,) str     ``"train"`` or ``"test"``
      images      (N, C, H, W) uint8
      labels      (N,) int64   human label available to the pipeline, ``UNLABELED`` (-1) where none
      true_labels (N,) int64 or None
                               hidden benchmark labels (the labels a labeler would give); None for a real pool.
                               Only reports and the labeled-subset simulation may read them.
      classes     list[str]    class names, index = label
      paths       (N,) str or None   file path relative to the dataset root (folder sources)
      flags       visible per-sample columns added by variants, e.g. ``is_corrupted`` (bool), ``corruption`` (str)
      hidden      hidden per-sample columns for reports only, e.g. ``is_mislabeled`` (bool), ``clean_label``
      info        JSON-able description of how the pool was made (source, resolved paths, variants applied)
    """

    sample_ids: np.ndarray
    split: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    true_labels: np.ndarray | None = None
    paths: np.ndarray | None = None
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    hidden: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def is_benchmark(self) -> bool:
        return self.true_labels is not None

    def take(self, index: np.ndarray) -> "Pool":
        """The pool restricted to ``index`` (a bool mask or integer positions), in that order."""

        def pick(a):
            return None if a is None else a[index]

        return replace(
            self,
            sample_ids=self.sample_ids[index],
            split=self.split[index],
            images=self.images[index],
            labels=self.labels[index],
            true_labels=pick(self.true_labels),
            paths=pick(self.paths),
            flags={k: v[index] for k, v in self.flags.items()},
            hidden={k: v[index] for k, v in self.hidden.items()},
        )

    def reference_labels(self) -> np.ndarray:
        """Labels used to stratify variants: the hidden true labels for benchmarks, else the human labels."""
        return self.true_labels if self.true_labels is not None else self.labels
