"""Datasets: sources, benchmark variants, the labeled subset, and the prepare stage's outputs.

Every source returns a :class:`Pool` (both splits, uint8 (N, C, H, W) images, keyed by ``sample_id``);
variants transform pools; :func:`build_pool` chains them as the ``data`` params say, and
:func:`write_prepare_outputs` writes the manifest, images and hidden labels.
"""

from .folder import IMAGE_EXTENSIONS, load_imagefolder, read_labels_csv, scan_images
from .folds import assign_folds
from .idx import parse_idx, read_idx
from .labeled import choose_labeled
from .manifest import (
    build_pool,
    check_unique_ids,
    content_hashes,
    hidden_table,
    images_table,
    manifest_table,
    prepare_metrics,
    read_hidden_labels,
    read_images,
    read_manifest,
    write_prepare_outputs,
)
from .pool import UNLABELED, Pool
from .sources import FASHION_MNIST_CLASSES, MNIST_CLASSES, load_cifar, load_idx_source, load_source
from .synthetic import make_synthetic
from .variants import CORRUPTIONS, corrupt, long_tail, long_tail_counts, subsample

__all__ = [
    "assign_folds",
    "CORRUPTIONS", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "MNIST_CLASSES", "UNLABELED", "Pool",
    "build_pool", "check_unique_ids", "choose_labeled", "content_hashes", "corrupt", "hidden_table", "images_table",
    "load_cifar", "load_idx_source", "load_imagefolder", "load_source", "long_tail", "long_tail_counts",
    "make_synthetic", "manifest_table", "parse_idx", "prepare_metrics", "read_hidden_labels", "read_idx",
    "read_images", "read_labels_csv", "read_manifest", "scan_images", "subsample", "write_prepare_outputs",
]
