"""``xmr serve``: Triton Inference Server (PyTriton's bundled ``tritonserver``) with xmr's models.

The repository (``repository.write_repository``) goes to a fresh workspace; PyTriton starts
``tritonserver`` on it (explicit model control, every model loaded, strict readiness: ready
only when every model has loaded its scorer and gallery) with the Python-backend stub of this
interpreter. SIGINT and SIGTERM stop it: Triton stops accepting, finishes in-flight requests
(at most ``exit_timeout_s``) and exits; the workspace is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sysconfig
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xmr.errors import InputError, XmrError
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.gallery import is_gallery
from xmr.serve.repository import ServeConfig, model_names, write_repository

READY_TIMEOUT_S = 600.0  # encoding a large gallery at start can take minutes
EXIT_TIMEOUT_S = 10  # in-flight requests finish within this at shutdown


class ServeError(XmrError, RuntimeError):
    """The server could not start, or stopped on its own."""


def check_sources(config: ServeConfig) -> Artifacts:
    """The artifacts of ``config`` (checked) after checking that its galleries exist, so
    mistakes are one line before any server starts."""
    config.validate()
    for name, source, suffix in (("images", config.images, ".npy"), ("captions", config.captions, ".txt")):
        if source is None:
            continue
        path = Path(source)
        if not (is_gallery(path) or (path.is_file() and path.suffix == suffix)):
            raise InputError(f"--{name} {source}: not a {suffix} file or a saved gallery directory")
    return Artifacts.open(config.artifacts)


def python_environment() -> dict[str, str]:
    """What Triton's Python-backend stub needs to run this interpreter's packages: its
    libpython on the library path (the stub links the shared library; a pyenv or venv
    interpreter's is not on the system path)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p]
    return {"LD_LIBRARY_PATH": ":".join(paths)}


@contextmanager
def running_server(config: ServeConfig, ready_timeout_s: float = READY_TIMEOUT_S,
                   exit_timeout_s: int = EXIT_TIMEOUT_S, log_file: Path | None = None,
                   repository: Path | None = None) -> Iterator[Any]:
    """Triton serving ``config``'s models until the block exits (then stopped, its workspace
    removed). Yields once the server is ready; ``ServeError`` if it is not within
    ``ready_timeout_s`` or exits before. ``repository``: serve that model repository (one
    ``xmr triton-repo`` wrote) at ``config``'s addresses instead."""
    artifacts = check_sources(config) if repository is None else None
    try:
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise ServeError('xmr serve needs the serve extra: pip install -e ".[serve]"') from e
    workspace = Path(tempfile.mkdtemp(prefix="xmr-serve-"))
    saved = {name: os.environ.get(name) for name in ("LD_LIBRARY_PATH", "TMPDIR")}
    triton = None
    try:
        if artifacts is not None:
            repository = write_repository(workspace / "models", config, artifacts.regions,
                                          artifacts.config["img_dim"], gpu=(config.device or "").startswith("cuda"))
        (workspace / "tmp").mkdir()
        os.environ.update({**python_environment(), "TMPDIR": str(workspace / "tmp")})
        triton_config = TritonConfig(
            model_repository=repository, http_address=config.host, grpc_address=config.host,
            metrics_address=config.host, http_port=config.http_port, grpc_port=config.grpc_port,
            metrics_port=config.metrics_port, strict_readiness=True, exit_on_error=True,
            exit_timeout_secs=exit_timeout_s, log_file=log_file)
        triton = Triton(config=triton_config, workspace=workspace / "triton")
        # Start tritonserver only: PyTriton's run() then waits up to 120 s for readiness, even after
        # the server has exited (a model failed to load); wait_ready notices an exit at once and
        # gives a large gallery longer to encode.
        triton._run_server()
        wait_ready(f"http://{config.host}:{config.http_port}", ready_timeout_s, triton.is_alive)
        yield triton
    finally:
        if triton is not None:
            # PyTriton's workspace clean() can trip over its own rmtree (a CleanupWarning); the
            # whole workspace is removed below anyway.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Could not clean workspace")
                triton.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(workspace, ignore_errors=True)


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Return when ``url``'s ``/v2/health/ready`` answers 200; ``ServeError`` if the server
    dies first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise ServeError("Triton stopped while loading the models (its log above says why)")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise ServeError(f"Triton was not ready within {timeout_s:.0f} s ({url}/v2/health/ready)")


def serve(config: ServeConfig, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM (or until the server stops on its own: ``ServeError``)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running_server(config) as triton:
            announce(f"xmr serve: ready. HTTP http://{config.host}:{config.http_port}, gRPC "
                     f"{config.host}:{config.grpc_port}, metrics http://{config.host}:{config.metrics_port}/metrics; "
                     f"models {', '.join(model_names(config))}. Ctrl-C stops.")
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise ServeError("Triton stopped on its own (its log above says why)")
            announce("xmr serve: stopping (in-flight requests finish first)")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
