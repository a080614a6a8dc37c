"""What later stages read of the prepare stage's outputs, as aligned arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io import table_meta
from .manifest import IMAGES, MANIFEST, content_hashes, read_images, read_manifest
from .pool import UNLABELED

PREPARE_DIR = Path("artifacts/prepare")


@dataclass(frozen=True)
class Prepared:
    """The manifest joined with its images (row i of every array is the same sample).

    sample_ids (N,) str; split (N,) str; labels (N,) int64 (UNLABELED where no human label);
    is_labeled (N,) bool; images (N, C, H, W) uint8 (read-only); classes list[str].
    """

    sample_ids: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    is_labeled: np.ndarray
    images: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_prepared(folder: str | Path = PREPARE_DIR, *, verify: bool = True) -> Prepared:
    """Read manifest + images; with ``verify``, every image must match its manifest content hash."""
    folder = Path(folder)
    manifest = read_manifest(folder / MANIFEST)
    ids, images = read_images(folder / IMAGES)
    sample_ids = manifest["sample_id"].to_numpy(zero_copy_only=False)
    if len(ids) != len(sample_ids) or not np.array_equal(ids, sample_ids):
        raise DataError(f"{folder}: images and manifest list different samples", "re-run the prepare stage")
    if verify and content_hashes(images) != manifest["content_hash"].to_pylist():
        raise DataError(f"{folder}: an image does not match its manifest content hash", "re-run the prepare stage")
    labels = manifest["label"].fill_null(UNLABELED).to_numpy().astype(np.int64)
    classes = table_meta(manifest).get("class_names")
    if not classes:
        raise DataError(f"{folder / MANIFEST} has no class names in its metadata", "re-run the prepare stage")
    return Prepared(
        sample_ids=sample_ids,
        split=manifest["split"].to_numpy(zero_copy_only=False),
        labels=labels,
        is_labeled=manifest["is_labeled"].to_numpy(zero_copy_only=False).astype(bool),
        images=images,
        classes=list(classes),
    )
