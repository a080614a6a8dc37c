"""Native CPU kernels: C sources in this package, compiled once per machine, called through ctypes.

A kernel here exists only where a profile showed torch's CPU kernel as a large share of a training
step, and it computes the same bits as torch's: callers fall back to torch where none can be built
(no C compiler, a read-only cache, a failed build) or where ``SEMIPRUNE_NATIVE=0`` turns them off,
and only speed changes.

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native -shared -fPIC -fopenmp``, about 0.4 s, into
``$XDG_CACHE_HOME/semiprune/kernels`` (default ``~/.cache/...``) under a name hashed from the
source, the command and the CPU (``-march=native`` code may not run on another CPU that shares the
cache). A build is written under a temporary name and renamed, so processes that build at once
(concurrent fold stages) never load a half-written library. A cache folder that another user owns
or may write is refused (torch's kernels run instead): a library planted there would run in every
training process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")


def enabled() -> bool:
    """False when ``SEMIPRUNE_NATIVE=0``: every caller then uses torch's kernels (for A/B timings)."""
    return os.environ.get("SEMIPRUNE_NATIVE", "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semiprune" / "kernels"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def _check_private(folder: Path) -> None:
    """Refuse a cache folder that another user owns or may write: a library planted there would run
    inside every training process."""
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{folder} is not private to this user (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}); "
                      f"run chmod 700 on it or point XDG_CACHE_HOME elsewhere")


def _build(compiler: str, source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(tmp)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``<name>.c`` (built now if this machine has none, again if the cached
    one is damaged), or None with the reason logged once."""
    if not enabled():
        return None
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join(
        [source.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), platform.machine().encode(), _cpu_identity().encode()]
    )).hexdigest()[:20]
    target = cache_dir() / f"{name}-{key}.so"
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_private(target.parent)
        if not target.exists():
            _build(compiler, source, target)
        try:
            return ctypes.CDLL(str(target))
        except OSError as e:
            logger.info("native kernel %s: the cached %s does not load (%s); building it again", name, target, e)
            _build(compiler, source, target)
            return ctypes.CDLL(str(target))
    except subprocess.CalledProcessError as e:
        reason = f"{compiler} failed: {(e.stderr or '').strip().splitlines()[-1:] or e}"
    except (OSError, subprocess.SubprocessError) as e:
        reason = str(e)
    logger.info("native kernel %s unavailable (%s); using torch's kernel, which is slower", name, reason)
    return None
