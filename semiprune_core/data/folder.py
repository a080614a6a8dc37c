"""The ``imagefolder`` source: a real pool of image files, few of them labeled.

Layouts of ``root``:

- class folders (no labels CSV): ``root/<class>/<file>`` (files may sit deeper inside a class folder);
  every image is labeled by its class folder. Images loose in ``root`` itself are an error.
- flat folder + labels CSV: every image under ``root`` at any depth; the CSV (header
  ``sample_id,label``; sample_id = path relative to root with ``/``; label = class name) labels some
  of them, the rest are the unlabeled pool.

``test_root`` (class folders, all labeled) is the test split; its sample_ids are ``test/<relative path>``
and ``paths`` stays relative to ``test_root``. Without it the pool has no test rows
(``info["has_test"] = False``). Classes are the union of the CSV / folder classes and the test classes,
sorted by name; a CSV class that the test folder lacks is logged as a warning (often a typo).

Files: extensions png, jpg, jpeg, bmp, gif, webp, tif, tiff (any case). Names starting with ``.`` are
ignored. Names that are not valid UTF-8 and symlinks leading outside the root are skipped with a
warning and listed in ``info["excluded"]``, as are files that cannot be decoded or have more than
``max_image_pixels`` pixels (checked from the header, before decoding).

Each image is converted to L (channels=1) or RGB (channels=3) and resized directly to
``image_size`` x ``image_size`` with PIL's antialiased bilinear filter: the aspect ratio is NOT kept.

Decode cache: one Parquet file per (resolved root, channels, image_size) in ``cache_dir``, one row
per file keyed by (relative path, file size, mtime_ns), holding the decoded bytes (or why the file
was unusable, and its pixel count). A re-run decodes only new or changed files; the cache is
rewritten atomically, and only when something changed. It is scratch: deleting it is always safe.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ..errors import DataError
from ..io import PARQUET_OPTIONS, atomic_path, read_parquet
from ..io import sha256_file
from ._common import from_fixed_binary, to_fixed_binary
from .pool import UNLABELED, Pool

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_CACHE_VERSION = "1"


def load_imagefolder(root: Path, *, labels_csv: Path | None = None, test_root: Path | None = None,
                     image_size: int = 32, channels: int = 3, max_image_pixels: int = 50_000_000,
                     cache_dir: Path) -> Pool:
    """Read an image folder (and optional labels CSV and test folder) into a real :class:`Pool`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist", "set data.root to the folder holding your images")
    files, excluded = scan_images(root)
    if labels_csv is not None:
        labels = read_labels_csv(Path(labels_csv), known=set(files), root=root,
                                 skipped={e["path"]: e["reason"] for e in excluded})
    else:
        labels = class_folder_labels(root, files, what="data.root")

    test_files, test_labels, test_excluded = [], {}, []
    if test_root is not None:
        test_root = Path(test_root)
        if not test_root.is_dir():
            raise DataError(f"test folder {test_root} does not exist", "fix data.test_root, or set it to null")
        test_files, test_excluded = scan_images(test_root)
        if not test_files:
            raise DataError(f"test folder {test_root} holds no images", "put test images in test_root/<class>/ folders")
        test_labels = class_folder_labels(test_root, test_files, what="data.test_root")
        unknown = sorted(set(labels.values()) - set(test_labels.values()))
        if unknown:
            log.warning("classes in the train labels but not in %s: %s (a typo?)", test_root, ", ".join(unknown[:10]))
    classes = sorted(set(labels.values()) | set(test_labels.values()))
    index = {name: i for i, name in enumerate(classes)}
    opts = dict(image_size=image_size, channels=channels, max_pixels=max_image_pixels, cache_dir=Path(cache_dir))

    images, ok, failed = decode_folder(root, files, **opts)
    excluded += failed
    train = [f for f, good in zip(files, ok) if good]
    if not train:
        example = f", e.g. {excluded[0]['path']}: {excluded[0]['reason']}" if excluded else ""
        raise DataError(f"no usable images in {root} ({len(excluded)} file(s) excluded{example})",
                        f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under data.root")
    paths, label_ids, blocks = list(train), [index[labels[f]] if f in labels else UNLABELED for f in train], [images[ok]]
    sample_ids = list(train)
    if test_root is not None:
        test_images, test_ok, test_failed = decode_folder(test_root, test_files, **opts)
        excluded += [{**e, "path": f"test/{e['path']}"} for e in test_excluded + test_failed]
        test = [f for f, good in zip(test_files, test_ok) if good]
        paths += test
        sample_ids += [f"test/{f}" for f in test]
        label_ids += [index[test_labels[f]] for f in test]
        blocks.append(test_images[test_ok])
    if excluded:
        log.warning("excluded %d file(s), e.g. %s", len(excluded),
                    "; ".join(f"{e['path']} ({e['reason']})" for e in excluded[:3]))

    return Pool(
        sample_ids=np.array(sample_ids, dtype=str),
        split=np.array(["train"] * len(train) + ["test"] * (len(sample_ids) - len(train)), dtype=str),
        images=np.concatenate(blocks),
        labels=np.array(label_ids, dtype=np.int64),
        classes=classes,
        paths=np.array(paths, dtype=str),
        info={
            "source": "imagefolder",
            "folder": str(root),
            "test_folder": None if test_root is None else str(test_root),
            "layout": "labels-csv" if labels_csv is not None else "class-folders",
            "labels_csv": None if labels_csv is None else {"path": str(labels_csv), "sha256": sha256_file(Path(labels_csv))},
            "image_size": image_size,
            "channels": channels,
            "resize": "direct to a square, aspect not kept, PIL bilinear (antialiased)",
            "excluded": excluded,
            "has_test": test_root is not None,
        },
    )


# ---------------------------------------------------------------------------------------- scanning


def printable(name: str) -> str:
    """A file name that may hold undecodable bytes (as surrogates), made safe to log and store."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan_images(root: Path) -> tuple[list[str], list[dict]]:
    """Image files under ``root`` at any depth: (sorted relative ``/`` paths, skipped entries with a reason).

    Symlinks are followed when they stay inside ``root`` (a folder reached twice is read once) and
    skipped with a reason when they lead outside; names that are not valid UTF-8 are skipped too.
    """
    root_real = root.resolve()
    found, skipped = [], []
    seen = {root_real}
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append({"path": printable(prefix) or ".", "reason": f"cannot list folder ({err.strerror})"})
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if not _is_utf8(entry.name):
                skipped.append({"path": printable(rel), "reason": "name is not valid UTF-8"})
                continue
            if entry.is_symlink() and not Path(entry.path).resolve().is_relative_to(root_real):
                skipped.append({"path": rel, "reason": "symlink leads outside the root"})
            elif entry.is_dir():
                real = Path(entry.path).resolve()
                if real not in seen:
                    seen.add(real)
                    stack.append((Path(entry.path), rel + "/"))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(rel)
    return sorted(found), sorted(skipped, key=lambda e: e["path"])


def class_folder_labels(root: Path, files: list[str], *, what: str) -> dict[str, str]:
    """{relative path: class} where the class is the first folder of the path."""
    loose = [f for f in files if "/" not in f]
    if loose:
        raise DataError(
            f"{root} holds {len(loose)} image(s) outside class folders (e.g. {loose[0]}) and no labels CSV is set",
            f"sort them into {what}/<class>/ folders, or set data.labels_csv to label some files of a flat folder",
        )
    return {f: f.split("/", 1)[0] for f in files}


_ABSOLUTE = re.compile(r"^([/\\]|[A-Za-z]:)")


def _csv_rows(reader, path: Path):
    """The rows of ``reader``; a line the csv module refuses (e.g. a field over its size limit) is a DataError."""
    try:
        yield from reader
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: not a valid CSV line ({err})",
                        "write one sample_id,label pair per line") from None


def read_labels_csv(path: Path, *, known: set[str], root: Path, skipped: dict[str, str] | None = None) -> dict[str, str]:
    """A labels CSV -> {relative path: class name}. Every error names the CSV line.

    Header ``sample_id,label``; blank lines are skipped; ``./`` and doubled ``/`` in paths are tolerated.
    ``skipped``: {relative path: reason} of entries the scan passed over, named when a line points at one.
    """
    if not path.is_file():
        raise DataError(f"labels CSV {path} not found", "fix data.labels_csv, or set it to null")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"labels CSV {path} is not UTF-8 text", "save it as UTF-8") from None
    except OSError as err:
        raise DataError(f"cannot read labels CSV {path} ({err.strerror})", "check the file and its permissions") from None
    skipped = skipped or {}
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = _csv_rows(reader, path)
    header = next(rows, None)
    if header is None or [h.strip().lower() for h in header] != ["sample_id", "label"]:
        raise DataError(f"{path} line 1: header is {','.join(header or [])!r}, expected 'sample_id,label'",
                        "add the header line sample_id,label")
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row in rows:
        where = f"{path} line {reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise DataError(f"{where}: {len(row)} fields, expected 2 (sample_id,label)", "quote values that hold commas")
        sid, label = row[0].strip(), row[1].strip()
        if _ABSOLUTE.match(sid):
            raise DataError(f"{where}: sample_id {sid!r} is an absolute path", "write paths relative to data.root")
        if "\\" in sid:
            raise DataError(f"{where}: sample_id {sid!r} uses '\\'", "separate folders with '/'")
        parts = [p for p in sid.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise DataError(f"{where}: sample_id {sid!r} uses '..' and may leave the root",
                            "write paths relative to data.root without '..'")
        sid = "/".join(parts)
        if sid not in known:
            # the file or a folder on its way was skipped, e.g. a symlink leading outside the root
            hit = next((p for p in ("/".join(parts[:i]) for i in range(len(parts), 0, -1)) if p in skipped), None)
            why = f" (skipped: {skipped[hit]})" if hit else ""
            raise DataError(f"{where}: {sid!r} is not an image file under {root}{why}",
                            "fix the path (relative to data.root, with '/') or remove the line")
        if sid in out:
            raise DataError(f"{where}: sample_id {sid!r} is listed twice (also on line {first_line[sid]})",
                            "keep one label per file")
        if not label:
            raise DataError(f"{where}: empty label for {sid!r}", "give a class name, or remove the line")
        out[sid] = label
        first_line[sid] = reader.line_num
    return out


# ---------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Decoded:
    """One file's decode result: ``pixels`` = width*height (-1 if the header is unreadable).

    ``image`` (C, S, S) uint8, or None with ``error`` saying why; None with no error means the file
    was over the pixel limit and was not decoded.
    """

    pixels: int
    image: np.ndarray | None = None
    error: str | None = None


def decode_image(path: Path, *, image_size: int, channels: int, max_pixels: int) -> Decoded:
    """Decode one image file: size checked from the header first, then convert and resize."""
    pixels = -1
    try:
        with Image.open(path) as img:
            pixels = img.size[0] * img.size[1]
            if pixels > max_pixels:
                return Decoded(pixels)
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    # PIL's plugins raise OSError, ValueError, SyntaxError, struct.error, ... on damaged files.
    except Exception as err:  # noqa: BLE001
        return Decoded(pixels, error=" ".join(f"{type(err).__name__}: {err}".split()))
    return Decoded(pixels, arr[None] if channels == 1 else arr.transpose(2, 0, 1))


def decode_folder(root: Path, files: list[str], *, image_size: int, channels: int, max_pixels: int,
                  cache_dir: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode ``files`` (relative to ``root``) through the decode cache.

    Returns images (n, C, S, S) uint8 (zeros where unusable), usable (n,) bool, and
    ``[{"path", "reason"}]`` for the unusable files.
    """
    n, shape = len(files), (channels, image_size, image_size)
    nbytes = int(np.prod(shape))
    cache_path = cache_file(cache_dir, root, image_size=image_size, channels=channels)
    cache = _read_cache(cache_path, nbytes)
    images = np.zeros((n, *shape), np.uint8)
    pixels = np.full(n, -1, np.int64)
    has_image = np.zeros(n, bool)
    errors: list[str | None] = [None] * n
    keys: list[tuple[str, int, int]] = []
    hits, decoded = [], 0
    for i, rel in enumerate(files):
        try:
            st = os.stat(root / rel)
            key = (rel, st.st_size, st.st_mtime_ns)
        except OSError as err:
            key, errors[i] = (rel, -1, -1), f"cannot read ({err.strerror})"
        keys.append(key)
        if errors[i] is not None:
            continue
        row = cache["rows"].get(key)
        if row is not None and (cache["has_image"][row] or cache["errors"][row] or cache["pixels"][row] > max_pixels):
            hits.append((i, row))
            continue
        result = decode_image(root / rel, image_size=image_size, channels=channels, max_pixels=max_pixels)
        decoded += 1
        pixels[i], errors[i] = result.pixels, result.error
        if result.image is not None:
            images[i], has_image[i] = result.image, True
        if decoded % 5000 == 0:
            log.info("decoded %d of %d images in %s", decoded, n, root)
    if hits:
        idx, rows = map(np.array, zip(*hits))
        images[idx] = cache["images"][rows].reshape(-1, *shape)
        has_image[idx], pixels[idx] = cache["has_image"][rows], cache["pixels"][rows]
        for i, row in hits:
            errors[i] = cache["errors"][row]
    log.info("%s: decoded %d image(s), %d from the cache", root, decoded, len(hits))
    if decoded or len(cache["rows"]) != len(hits):
        _write_cache(cache_path, keys, images.reshape(n, nbytes), has_image, pixels, errors,
                     image_size=image_size, channels=channels)

    ok = has_image & (pixels <= max_pixels)
    failed = []
    for i in np.flatnonzero(~ok):
        reason = errors[i] or f"{pixels[i]} pixels, over data.max_image_pixels={max_pixels}"
        failed.append({"path": files[i], "reason": reason})
    return images, ok, failed


def cache_file(cache_dir: Path, root: Path, *, image_size: int, channels: int) -> Path:
    """The decode-cache file for ``root`` at this output size."""
    tag = hashlib.blake2b(str(Path(root).resolve()).encode(), digest_size=8).hexdigest()
    return Path(cache_dir) / f"imagefolder-{tag}-{channels}x{image_size}x{image_size}.parquet"


def _read_cache(path: Path, nbytes: int) -> dict:
    empty = {"rows": {}, "images": np.zeros((0, nbytes), np.uint8), "has_image": np.zeros(0, bool),
             "pixels": np.zeros(0, np.int64), "errors": []}
    if not path.exists():
        return empty
    try:
        table = read_parquet(path)
        if (table.schema.metadata or {}).get(b"cache_version") != _CACHE_VERSION.encode() or \
                table.schema.field("image").type != pa.binary(nbytes):
            raise ValueError("written by another version")
        keys = zip(table["path"].to_pylist(), table["size"].to_pylist(), table["mtime_ns"].to_pylist())
        return {
            "rows": {key: i for i, key in enumerate(keys)},
            "images": from_fixed_binary(table["image"]),
            "has_image": table["image"].is_valid().to_numpy(),
            "pixels": table["pixels"].to_numpy(),
            "errors": table["error"].to_pylist(),
        }
    # A damaged or foreign cache is only a lost speed-up: start over.
    except Exception as err:  # noqa: BLE001
        log.warning("ignoring decode cache %s (%s); decoding again", path, err)
        return empty


def _write_cache(path: Path, keys, flat: np.ndarray, has_image: np.ndarray, pixels: np.ndarray,
                 errors: list, *, image_size: int, channels: int) -> None:
    image = pc.if_else(pa.array(has_image), to_fixed_binary(flat), pa.scalar(None, pa.binary(flat.shape[1])))
    paths, sizes, mtimes = zip(*keys) if keys else ((), (), ())
    table = pa.table({
        "path": pa.array(paths, pa.string()),
        "size": pa.array(sizes, pa.int64()),
        "mtime_ns": pa.array(mtimes, pa.int64()),
        "pixels": pa.array(pixels, pa.int64()),
        "image": image,
        "error": pa.array(errors, pa.string()),
    }).replace_schema_metadata({"cache_version": _CACHE_VERSION, "image_size": str(image_size),
                                "channels": str(channels)})
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, **PARQUET_OPTIONS)
    except OSError as err:
        log.warning("cannot write decode cache %s (%s); the next run decodes again", path, err)
