"""Warm stage starts: ``python -m tasks.<stage>`` forked from a process that has imported torch already.

Importing torch costs every model stage about 1.1 s on two CPU cores before it does any work, more
where its CUDA libraries load from a slow disk. During a flow run a *stage server* imports torch,
numpy, pyarrow and pandas (which pyarrow loads to turn any column into numpy) once and listens on
a Unix socket (``SEMIPRUNE_STAGE_SERVER``). The stage process
that DVC starts is then only a client: ``tasks/__init__.py`` hands the server its command line,
working folder, environment and standard streams (the file descriptors themselves), the server
forks a child that runs the stage module there exactly as ``python -m`` would, and the client exits
with the child's exit code. To DVC and to the flow it is the same process with the same output.

What keeps it the same:
  - the child imports the project's own packages (``tasks``, ``semiprune_core``, ``flows``) afresh
    from the stage's folder: only third-party libraries come preloaded, so a stage runs the code DVC
    hashed;
  - the server refuses (and the stage starts cold, as before) when the client runs another
    interpreter or differs in a variable read at import time (threads, allocator, library paths);
  - signals the client receives (Ctrl-C, a timeout's TERM) are passed on to the child, and a child
    whose client dies (killed outright) kills itself, so killing "the stage" still kills it;
  - without a server, or when it cannot be reached, the stage starts cold: nothing else changes.

Only the standard library is imported here: the client runs before any stage code.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import struct
import sys
import threading

ENV = "SEMIPRUNE_STAGE_SERVER"
PRELOAD = ("torch", "numpy", "pyarrow.parquet", "yaml")
# imported once the socket listens: a stage that connects meanwhile waits for them, which costs it
# no more than importing them itself (pyarrow loads pandas, where installed, at its first to_numpy)
LATE_PRELOAD = ("pandas",)
PROJECT_PACKAGES = ("tasks", "semiprune_core", "flows")
# variables a library reads when it is imported (or the process starts): a client that sets them
# differently from the server is not forked from it
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TORCH", "PYTORCH_", "LD_", "PYTHON",
                        "MALLOC_", "GLIBC_TUNABLES", "ARROW_")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_LENGTH = struct.Struct("!I")
_CODE = struct.Struct("!i")


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


# --- the client: the process DVC started -------------------------------------------------------------


def delegate() -> None:
    """Run this ``python -m tasks.<stage>`` in the stage server and exit with its exit code; return
    (and let the stage start cold) when there is no server to take it."""
    path, argv = os.environ.get(ENV), sys.orig_argv
    if not path or len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith("tasks.") or argv[2] == __name__:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        env = {k: v for k, v in os.environ.items() if k != ENV}
        request = json.dumps({"module": argv[2], "argv": argv[3:], "cwd": os.getcwd(), "env": env,
                              "executable": sys.executable}).encode()
        socket.send_fds(sock, [_LENGTH.pack(len(request)) + request], [0, 1, 2])
        accepted = sock.recv(1) == b"Y"  # "N": the server, or the forked child's setup, turned it down
    except OSError:
        accepted = False
    if not accepted:
        sock.close()
        return
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        with contextlib.suppress(OSError):  # the child is gone already
            sock.sendall(bytes([signum]))

    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = b""
    while len(status) < _CODE.size:  # the exit code, or nothing when the child died without one
        chunk = sock.recv(_CODE.size - len(status))
        if not chunk:
            break
        status += chunk
    if len(status) == _CODE.size:
        os._exit(_CODE.unpack(status)[0])
    if received:  # the child died of the signal passed on to it: so does this process
        signal.signal(received[-1], signal.SIG_DFL)
        os.kill(os.getpid(), received[-1])
    print(f"error: {argv[2]} ended without an exit status: its process (forked from the stage server) "
          "was killed", file=sys.stderr)
    os._exit(1)


# --- the server ---------------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Import :data:`PRELOAD`, listen on ``path``, import :data:`LATE_PRELOAD`, and fork a child per
    stage until the parent ends.

    The socket appears only once torch is imported: a stage that starts before then starts cold
    rather than waiting for it.
    """
    _preload(PRELOAD)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    _preload(LATE_PRELOAD)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent, env = os.getppid(), _import_time_env(dict(os.environ))
    listener.settimeout(1.0)
    while os.getppid() == parent:  # an orphaned server (its flow was killed) ends within a second
        try:
            conn, _ = listener.accept()
        except (TimeoutError, InterruptedError):
            continue
        fds: list[int] = []
        try:
            conn.settimeout(10.0)
            request, fds = _receive(conn)
            if (request["executable"] != sys.executable or _import_time_env(request["env"]) != env
                    or _cuda_initialized()):
                conn.sendall(b"N")
                continue
            if os.fork() == 0:
                listener.close()
                _child(conn, request, fds)  # never returns
        except (OSError, ValueError, KeyError):
            pass  # a client that went away or sent no request: nothing was started for it
        finally:
            conn.close()
            for fd in fds:
                os.close(fd)


def _preload(names: tuple[str, ...]) -> None:
    for name in names:
        with contextlib.suppress(ImportError):  # not installed: its stages import nothing of it either
            importlib.import_module(name)


def _cuda_initialized() -> bool:
    """Whether this process has started CUDA, which a forked child could not use. Importing torch
    does not start it, and the server runs nothing else; this only keeps it so."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3 or len(data) < _LENGTH.size:
        raise ValueError("malformed request")
    (size,) = _LENGTH.unpack(data[:_LENGTH.size])
    body = data[_LENGTH.size:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    return json.loads(body), fds


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Become ``python -m <module> <argv>`` in the client's folder, environment and streams; report
    the exit code to the client and exit. If that cannot be set up, the client starts cold."""
    try:
        _become(request, fds)
        conn.sendall(b"Y")  # from here on the client waits for this process's exit code
    except BaseException:
        try:
            conn.sendall(b"N")
        finally:
            os._exit(1)
    code = 1
    try:
        conn.settimeout(None)
        threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
        code = _run_module(request["module"])
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with contextlib.suppress(OSError):  # a client that is gone needs no exit code
            conn.sendall(_CODE.pack(code))
        os._exit(code)


def _become(request: dict, fds: list[int]) -> None:
    """This process as ``python -m`` would start the stage: its folder, environment, streams, argv,
    the project's packages unloaded, fresh randomness."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    for name in [m for m in sys.modules if m.partition(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    sys.path[0] = request["cwd"]  # where `python -m` looks first
    sys.argv = [request["module"], *request["argv"]]
    # `top` and `ps -o comm` show the stage, not the server it was forked from
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(request["module"].removeprefix("tasks.")[:15])
    for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.reconfigure(line_buffering=fd == 2 or os.isatty(fd),
                           write_through=bool(request["env"].get("PYTHONUNBUFFERED")))
    _reseed()


def _run_module(module: str) -> int:
    import runpy
    import traceback

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:  # what the interpreter would do with an uncaught exception
        traceback.print_exc()
        return 1
    return 0


def _watch_client(conn: socket.socket) -> None:
    """Raise each signal the client passes on; when the client dies (killed outright, nothing passed
    on), kill this stage with the processes it started, as killing a cold stage's tree would."""
    while True:
        try:
            data = conn.recv(16)
        except OSError:
            data = b""
        if not data:
            import psutil

            for process in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    process.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        for signum in data:
            os.kill(os.getpid(), signum)


def _reseed() -> None:
    """Fresh unseeded randomness, as a process started cold has (forked children would share the server's)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


if __name__ == "__main__":
    serve(sys.argv[1])
