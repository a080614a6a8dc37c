"""Loading the CIFAR python batches, which are pickles, without executing anything they ask for.

The CIFAR files are pickled dicts of numpy arrays, lists, ints and bytes. :class:`RestrictedUnpickler`
resolves only the few globals numpy needs to rebuild an array; any other global (``os.system``,
``builtins.eval``, ...) is refused with a :class:`DataError` before it could be called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError


def _numpy_attr(module: str, name: str) -> Any:
    """Look ``name`` up in numpy's private core (``numpy._core`` on numpy 2, ``numpy.core`` on 1.x)."""
    core = getattr(np, "_core", None) or np.core
    return getattr(getattr(core, module), name)


# (module, name) as written in the pickle -> a resolver. Both spellings of numpy's core module occur:
# files written under numpy 1.x say numpy.core, under numpy 2.x numpy._core.
_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("codecs").encode,  # bytes pickled with protocol <= 2
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = lambda: _numpy_attr("multiarray", "_reconstruct")
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = lambda: _numpy_attr("multiarray", "scalar")
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = lambda: _numpy_attr("numeric", "_frombuffer")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def __init__(self, file, *, name: str, **kwargs):
        super().__init__(file, **kwargs)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise DataError(
                f"{self.name} is a pickle that asks for {module}.{name}; refused, only numpy arrays and plain "
                "containers may be loaded",
                "replace it with the original dataset file",
            )
        return resolve()


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle of numpy arrays / dicts / lists / bytes (keys of Python 2 pickles stay ``bytes``)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror})", "check the file and its permissions") from None
    try:
        return RestrictedUnpickler(io.BytesIO(raw), name=str(path), encoding="bytes").load()
    except DataError:
        raise
    # A damaged pickle can fail in many ways; each is the same problem for the user.
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"{path} is not a readable dataset pickle ({type(err).__name__}: {err})",
            "re-download and extract the dataset",
        ) from None
