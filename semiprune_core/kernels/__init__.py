"""Native CPU kernels: C sources in this package, compiled once per machine, called through ctypes.

A kernel here exists only where a profile showed torch's CPU kernels as a large share of a training
step. ``maxpool2`` computes torch's bits; ``conv_pool`` (a first conv fused with its pool) and
``bn_relu`` (a training-mode BatchNorm and its ReLU) compute torch's values up to the order of fp32
sums; ``conv_wgrad`` (a 3x3 conv's weight gradient on AMX tiles, where the CPU has them) sums in fp32
what oneDNN rounds to bf16. Callers fall back to torch where none can be built (no
C compiler, a read-only cache, a failed build) or where ``SEMIPRUNE_NATIVE=0`` turns them off.

Build: ``$CC`` (default ``cc``) with :data:`FLAGS` (``-O3 -march=native -fopenmp`` ...), about 0.5 s,
into ``$XDG_CACHE_HOME/semiprune/kernels`` (default ``~/.cache/...``) under a name hashed from the
source and the headers it may include, the command and the CPU (``-march=native`` code may not run
on another CPU that shares the cache). A build is written under a temporary name and renamed, so
processes that build at once (concurrent fold stages) never load a half-written library. A cache
folder that another user owns or may write is refused (torch's kernels run instead): a library
planted there would run in every training process.
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

#: -mprefer-vector-width=256: gcc 12 auto-vectorises with 512-bit registers on AMD CPUs with AVX-512,
#: where maxpool2's forward then ran 9x slower than with 256 (Intel's tuning already prefers 256).
#: Explicit vector types (conv_pool.c) still use 512-bit registers where the CPU has them.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=256", "-shared", "-fPIC", "-fopenmp")


#: every kernel in this package
NAMES = ("maxpool2", "conv_pool", "bn_relu", "views", "conv_wgrad", "conv_wgrad_f32")


def enabled(name: str | None = None) -> bool:
    """Whether kernel ``name`` (any kernel, for None) may run. ``SEMIPRUNE_NATIVE``: unset or ``1``
    all, ``0`` none (torch's kernels, for A/B timings), or a comma-separated list of names such as
    ``maxpool2`` (to time one kernel's share)."""
    value = os.environ.get("SEMIPRUNE_NATIVE", "1").strip()
    if value in ("1", ""):
        return True
    names = {v.strip() for v in value.split(",")} - {"0"}
    _warn_unknown(frozenset(names))
    return bool(names) if name is None else name in names


@functools.cache
def _warn_unknown(names: frozenset[str]) -> None:
    if unknown := sorted(names - set(NAMES)):
        logger.warning("SEMIPRUNE_NATIVE names unknown kernels %s (it takes 1, 0 or names from %s); "
                       "those run torch's kernels", ", ".join(unknown), ", ".join(NAMES))


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semiprune" / "kernels"


def _cpuinfo(*keys: str) -> list[str] | None:
    """The first line of ``/proc/cpuinfo`` that starts with each key ("" if none), or None where
    there is no such file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return [next((line for line in lines if line.startswith(key)), "") for key in keys]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for benchmark reports: kernels' speed depends on it."""
    found = _cpuinfo("model name")
    if found is None:
        return platform.processor() or platform.machine()
    return found[0].split(":", 1)[1].strip() if found[0] else platform.machine()


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    found = _cpuinfo("model name", "flags")
    return platform.processor() if found is None else "\n".join(found)


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


def build_key(source: Path, compiler: str) -> str:
    """What names a build: the source, every header beside it, the command and the CPU."""
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    return hashlib.sha256(b"\0".join(
        [source.read_bytes(), *headers, compiler.encode(), " ".join(FLAGS).encode(), platform.machine().encode(), _cpu_identity().encode()]
    )).hexdigest()[:20]


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``<name>.c`` (built now if this machine has none, again if the cached
    one is damaged), or None with the reason logged once."""
    if not enabled(name):
        return None
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC", "cc")
    target = cache_dir() / f"{name}-{build_key(source, compiler)}.so"
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


def available() -> list[str]:
    """The kernels that run in this process, as each kernel's module decides (built, not turned off,
    and whatever the CPU must have, such as AMX for ``conv_wgrad``): for benchmark reports."""
    import importlib

    return [name for name in NAMES if importlib.import_module(f"{__name__}.{name}")._library() is not None]
