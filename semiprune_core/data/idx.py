"""IDX files (MNIST, Fashion-MNIST), gzipped or not.

Format: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions, one big-endian uint32
per dimension, then the data. Anything else is a :class:`DataError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

_UINT8 = 0x08
_MAX_ELEMENTS = 2**31  # refuse headers that would ask for more than 2 GiB
_MAX_HEADER = 4 + 4 * 4


def parse_idx(raw: bytes, *, name: str = "IDX data") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a uint8 array of the stated shape."""
    fix = "re-download or reinstall the dataset"
    if len(raw) < 4:
        raise DataError(f"{name} is truncated: {len(raw)} bytes, no IDX header", fix)
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise DataError(f"{name} is not an IDX file (bad magic number)", fix)
    if dtype != _UINT8:
        raise DataError(f"{name} holds IDX type 0x{dtype:02x}; only unsigned bytes (0x08) are supported", fix)
    if not 1 <= ndim <= 4:
        raise DataError(f"{name} declares {ndim} dimensions; image/label files have 1 to 4", fix)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated inside its header", fix)
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(shape)  # exact: four uint32 dimensions overflow int64
    # a zero dimension makes the count 0 whatever the others say, and numpy refuses huge ones even then
    if math.prod(d or 1 for d in shape) > _MAX_ELEMENTS:
        raise DataError(f"{name} declares shape {shape}, larger than any supported dataset", fix)
    if len(raw) - header != count:
        state = "truncated" if len(raw) - header < count else "longer than its header says"
        raise DataError(f"{name} is {state}: header {shape} needs {count} bytes, file has {len(raw) - header}", fix)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _gunzip(raw: bytes, limit: int) -> bytes:
    """Every gzip member of ``raw``, decompressed, but never more than ``limit + 1`` bytes (a gzip bomb
    stops there instead of filling the memory)."""
    chunks, left = [], limit + 1
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as gz:
        while left > 0 and (chunk := gz.read1(min(left, 1 << 24))):
            chunks.append(chunk)
            left -= len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    fix = "re-download or reinstall the dataset"
    limit = _MAX_HEADER + _MAX_ELEMENTS
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = _gunzip(raw, limit)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path} is a damaged gzip file ({err})", fix) from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror})", "check the file and its permissions") from None
    if len(raw) > limit:
        raise DataError(f"{path} decompresses to more than {limit} bytes, larger than any supported dataset", fix)
    return parse_idx(raw, name=str(path))
