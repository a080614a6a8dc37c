"""Dataset sources: each returns a :class:`Pool` holding both splits as uint8 (N, C, H, W) images.

Benchmark sources (``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``synthetic``) know every
label: ``true_labels`` holds them all, ``labels`` is UNLABELED for train rows and the true label for
test rows (test labels exist to measure accuracy). The labeled subset is chosen later
(:mod:`.labeled`). ``imagefolder`` (:mod:`.folder`) is a real pool: few human labels, no true labels.

``info["folder"]`` records the folder used as it was found (not made absolute), so the manifest does
not change when a checkout moves.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from ..compat import import_torchvision
from ..config import Data
from ..errors import DataError
from .folder import load_imagefolder
from .idx import read_idx
from ..io import sha256_file
from ._common import benchmark_pool
from .pool import Pool
from .safe_pickle import load_pickle
from .synthetic import make_synthetic

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where a Debian package puts the files (``apt-get install dataset-fashion-mnist``).
SYSTEM_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
_TORCHVISION_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}

CIFAR_LAYOUT = {
    # source: (folder, train files, test file, meta file, label key, names key, number of classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names", 100),
}


def load_source(cfg: Data, *, seed: int, cache_dir: Path) -> Pool:
    """Read the source ``cfg.source`` names into a :class:`Pool` (no variants, no labeled subset yet)."""
    root = Path(cfg.root) if cfg.root else None
    if cfg.source in ("fashion-mnist", "mnist"):
        return load_idx_source(cfg.source, root=root, download=cfg.download)
    if cfg.source in CIFAR_LAYOUT:
        return load_cifar(cfg.source, root=root, download=cfg.download)
    if cfg.source == "imagefolder":
        if root is None:
            raise DataError("data.root is not set for source imagefolder", "set data.root to your image folder")
        return load_imagefolder(
            root,
            labels_csv=Path(cfg.labels_csv) if cfg.labels_csv else None,
            test_root=Path(cfg.test_root) if cfg.test_root else None,
            image_size=cfg.image_size,
            channels=cfg.channels,
            max_image_pixels=cfg.max_image_pixels,
            cache_dir=Path(cache_dir),
        )
    if cfg.source == "synthetic":
        return make_synthetic(seed=seed, **cfg.synthetic.model_dump())
    raise DataError(f"unknown data.source {cfg.source!r}", "use fashion-mnist, mnist, cifar10, cifar100, imagefolder or synthetic")


def source_paths(cfg: Data) -> list[Path]:
    """Every file or folder :func:`load_source` may read for ``cfg`` (existing or not); [] for synthetic."""
    root = Path(cfg.root) if cfg.root else None
    if cfg.source in ("fashion-mnist", "mnist"):
        places = [root, root / _TORCHVISION_CLASS[cfg.source] / "raw" if root else None, SYSTEM_DIRS[cfg.source]]
    elif cfg.source in CIFAR_LAYOUT:
        places = [root]
    elif cfg.source == "imagefolder":
        places = [root, Path(cfg.test_root) if cfg.test_root else None, Path(cfg.labels_csv) if cfg.labels_csv else None]
    else:
        places = []
    return [p for p in places if p is not None]


def stat_fingerprint(paths: list[Path]) -> dict[str, list]:
    """{file: [size, mtime_ns]} of every file at or under ``paths`` (a stat, no reads): cheap enough
    to run on every repro, so the prepare stage re-runs only when the raw data changed."""
    out: dict[str, list] = {}
    for place in paths:
        if place.is_file():
            st = place.stat()
            out[str(place)] = [st.st_size, st.st_mtime_ns]
        elif place.is_dir():
            for folder, dirs, files in os.walk(place):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    try:
                        st = os.stat(path)
                    except OSError:  # a dangling symlink: prepare lists it among the unusable files
                        out[path] = ["missing"]
                        continue
                    out[path] = [st.st_size, st.st_mtime_ns]
        else:
            out[str(place)] = ["missing"]
    return out


# ---------------------------------------------------------------------------------------- IDX (MNIST)


def find_idx_files(folder: Path) -> dict[str, Path] | str:
    """The four IDX files in ``folder`` (plain preferred over ``.gz``), or why they are not there."""
    if not folder.is_dir():
        return "no such folder"
    found, missing = {}, []
    for key, stem in IDX_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            missing.append(stem + "[.gz]")
    return found if not missing else "missing " + ", ".join(missing)


def load_idx_source(name: str, *, root: Path | None, download: bool, system_dir: Path | None = None) -> Pool:
    """Fashion-MNIST or MNIST from the four IDX files, searched in this order:

    1. ``root`` (or ``root/<FashionMNIST|MNIST>/raw``, where an earlier torchvision download put them);
    2. ``system_dir`` (default: the Debian package's folder, ``/usr/share/datasets/<name>``);
    3. if ``download``: a torchvision download into ``root``.

    If none works, one :class:`DataError` names all three places.
    """
    system_dir = SYSTEM_DIRS[name] if system_dir is None else system_dir
    raw_dir = root / _TORCHVISION_CLASS[name] / "raw" if root is not None else None
    tried = []
    for folder in (root, raw_dir, system_dir):
        if folder is None:
            continue
        files = find_idx_files(folder)
        if isinstance(files, dict):
            return _read_idx_pool(name, folder, files)
        if folder is not raw_dir or raw_dir.exists():  # root/<Class>/raw is only worth naming if it exists
            tried.append(f"{folder} ({files})")
    if root is None:
        tried.append("download (skipped: data.root is not set)")
    elif not download:
        tried.append("download (skipped: data.download is false)")
    else:
        failure = try_download(name, root)
        files = find_idx_files(raw_dir) if failure is None else failure
        if isinstance(files, dict):
            return _read_idx_pool(name, raw_dir, files)
        tried.append(f"torchvision download into {root} ({files})")
    fix = f"put the four IDX files (train-images-idx3-ubyte.gz, ...) in {root or 'data.root'}"
    if name == "fashion-mnist":
        fix = f"run `apt-get install dataset-fashion-mnist`, or {fix}"
    raise DataError(f"{name} IDX files not found; tried " + "; ".join(tried), fix)


def _read_idx_pool(name: str, folder: Path, files: dict[str, Path]) -> Pool:
    arrays = {key: read_idx(path) for key, path in files.items()}
    fix = "re-download or reinstall the dataset"
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{files[f'{split}_images']} / {files[f'{split}_labels']}: expected images (N, H, W) and "
                            f"labels (N,), got shapes {x.shape} and {y.shape}", fix)
        if len(x) != len(y):
            raise DataError(f"{files[f'{split}_labels']} has {len(y)} labels but {files[f'{split}_images']} has "
                            f"{len(x)} images", fix)
        if len(y) and int(y.max()) >= 10:
            raise DataError(f"{files[f'{split}_labels']} holds label {int(y.max())}; {name} has 10 classes (0-9)", fix)
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"{name} in {folder}: train images are {arrays['train_images'].shape[1:]} but test images "
                        f"are {arrays['test_images'].shape[1:]}", fix)
    log.info("%s: read %d train and %d test images from %s", name, len(arrays["train_labels"]),
             len(arrays["test_labels"]), folder)
    return benchmark_pool(
        arrays["train_images"][:, None], arrays["train_labels"], arrays["test_images"][:, None], arrays["test_labels"],
        classes=FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES,
        info={"source": name, "folder": str(folder), "files": {p.name: sha256_file(p) for p in files.values()}},
    )


def try_download(name: str, root: Path) -> str | None:
    """Download ``name`` into ``root`` with torchvision; None on success, else the reason (one line).

    Folders the failed attempt created are removed again, so a failure leaves nothing behind.
    """
    cls_name = _TORCHVISION_CLASS[name]
    created = [p for p in (root, root / cls_name, root / cls_name / "raw") if not p.exists()]
    chatter = io.StringIO()  # torchvision prints its progress
    try:
        datasets = import_torchvision().datasets
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            for train in (True, False):
                getattr(datasets, cls_name)(str(root), train=train, download=True)
    # Offline, torchvision raises RuntimeError, URLError, OSError, ...: all mean "download failed".
    except Exception as err:  # noqa: BLE001
        log.debug("torchvision output: %s", chatter.getvalue())
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"failed: {type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    return None


# ---------------------------------------------------------------------------------------- CIFAR


def load_cifar(name: str, *, root: Path | None, download: bool) -> Pool:
    """CIFAR-10 / CIFAR-100 (fine labels) from the python batches in ``root/<cifar-10-batches-py|cifar-100-python>``.

    ``root`` may also be that folder itself. The pickles are read with a restricted unpickler
    (:mod:`.safe_pickle`): anything but numpy arrays and plain containers is refused.
    """
    sub, train_files, test_file, meta_file, label_key, names_key, n_classes = CIFAR_LAYOUT[name]
    if root is None:
        raise DataError(f"data.root is not set for source {name}", f"set data.root to the folder holding {sub}/")
    folder = root if (root / meta_file).is_file() else root / sub
    needed = [*train_files, test_file, meta_file]
    missing = [f for f in needed if not (folder / f).is_file()]
    failure = None
    if missing and download:
        failure = try_download(name, root)
        missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        also = f" and the torchvision download into {root} {failure}" if failure else ""
        raise DataError(f"{name} files not found in {folder} (missing {', '.join(missing)}){also}",
                        f"download the CIFAR python version and extract it so that {folder}/ exists")

    meta = _keys_to_str(load_pickle(folder / meta_file), folder / meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, names_key, folder / meta_file)]
    if len(classes) != n_classes:
        raise DataError(f"{folder / meta_file} lists {len(classes)} class names; {name} has {n_classes}",
                        "re-download the dataset")
    splits = []
    for files in (train_files, [test_file]):
        xs, ys = [], []
        for f in files:
            x, y = _read_cifar_batch(folder / f, label_key, n_classes)
            xs.append(x)
            ys.append(y)
        splits.append((np.concatenate(xs), np.concatenate(ys)))
    (train_x, train_y), (test_x, test_y) = splits
    log.info("%s: read %d train and %d test images from %s", name, len(train_y), len(test_y), folder)
    return benchmark_pool(
        train_x, train_y, test_x, test_y, classes=classes,
        info={"source": name, "folder": str(folder), "files": {f: sha256_file(folder / f) for f in needed}},
    )


def _keys_to_str(obj, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict", "re-download the dataset")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise DataError(f"{path} has no {key!r} entry (keys: {', '.join(map(str, batch))})", "re-download the dataset")
    return batch[key]


def _read_cifar_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images (N, 3, 32, 32) uint8, labels (N,) int64."""
    batch = _keys_to_str(load_pickle(path), path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, label_key, path))
    fix = "re-download the dataset"
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)", fix)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} is not a list of integers", fix)
    if len(labels) != len(data):
        raise DataError(f"{path} has {len(labels)} labels but {len(data)} images", fix)
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise DataError(f"{path} holds label {int(bad[0])}; expected 0..{n_classes - 1}", fix)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)
