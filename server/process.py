"""``mfli serve``: the HTTP server process over the live LMDB index and users store.

One uvicorn worker per core (``--workers``, default ``serve.workers``). Workers are *spawned* by uvicorn
and each builds its app through :func:`app_factory`, reading the settings from ``MFLI_*`` environment
variables (this function writes the CLI overrides there first), so LMDB environments are opened in the
worker that uses them, never inherited across a fork.

With several workers, Prometheus runs in multi-process mode (one mmap file per worker under a private
directory) so ``/metrics`` on the shared port reports the sum over workers whichever worker answers.
BLAS is pinned to one thread per worker: the rerank matrices are small, and on a busy 2-core box
multi-threaded OpenBLAS spin-waits (measured 3-10x worse req/s, see :mod:`mfli.server.app`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from mfli.config import Settings, load_settings
from mfli.lifecycle import set_parent_death_signal

log = logging.getLogger(__name__)

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LOCK_ENV = "MFLI_SERVE_MONITOR_LOCK"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (serve.host)")
    parser.add_argument("--port", type=int, default=None, help="port (serve.port)")
    parser.add_argument("--workers", type=int, default=None, help="processes; one per core (serve.workers)")
    parser.add_argument("--index", default=None, help="index LMDB directory (index.path)")
    parser.add_argument("--users", default=None, help="users LMDB directory (learner.users_path)")
    parser.add_argument("--no-monitor", action="store_true", help="disable the recall/prequential sampler")
    parser.add_argument("--replica", action="store_true", default=None,
                        help="serve as a replica fed by Kafka, from copies in replication.data_dir (serve.replica)")
    parser.add_argument("--data-dir", default=None, help="replica: its own data directory (replication.data_dir)")
    parser.add_argument("--write-openapi", metavar="PATH", default=None,
                        help="write the OpenAPI document to PATH and exit")


def _metrics_body():
    """Renderer for /metrics: the multi-process collector when workers share a port, else the default."""
    from prometheus_client import CollectorRegistry, generate_latest

    if os.environ.get(_MULTIPROC_ENV):
        from prometheus_client import multiprocess

        def render() -> bytes:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)

        return render
    from mfli.metrics import process_registry

    registry = process_registry("server")
    return lambda: generate_latest(registry)


def app_factory():
    """Build the ASGI app inside a worker (uvicorn ``factory=True``)."""
    if os.environ.get(_MULTIPROC_ENV):
        # A spawned worker of a multi-worker server: it must not outlive its master (which the demo's
        # supervisor kills with the kernel's help if the supervisor itself is killed).
        set_parent_death_signal(signal.SIGTERM)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import ServerApp
    from .lmdb_state import LmdbState
    from .openapi import openapi_bytes

    if settings.serve.replica:
        from .replica import ReplicaState

        source: LmdbState = ReplicaState(settings)
    else:
        source = LmdbState(settings)
    lock = os.environ.get(_LOCK_ENV)
    monitor = os.environ.get("MFLI_SERVE_NO_MONITOR") != "1"
    return ServerApp(settings, source, _metrics_body(), openapi_bytes(settings.serve), monitor=monitor,
                     monitor_lock=Path(lock) if lock else None)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.write_openapi:
        from .openapi import openapi_bytes

        Path(args.write_openapi).write_bytes(openapi_bytes(settings.serve))
        log.info("wrote %s", args.write_openapi)
        return 0
    import uvicorn

    from .transport import CoalescingHttpToolsProtocol

    # CLI flags become environment overrides so spawned workers load the same settings.
    overrides = {"MFLI_SERVE__HOST": args.host, "MFLI_SERVE__PORT": args.port, "MFLI_SERVE__WORKERS": args.workers,
                 "MFLI_INDEX__PATH": args.index, "MFLI_LEARNER__USERS_PATH": args.users,
                 "MFLI_SERVE__REPLICA": "true" if args.replica else None, "MFLI_REPLICATION__DATA_DIR": args.data_dir}
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = str(value)
    if args.no_monitor:
        os.environ["MFLI_SERVE_NO_MONITOR"] = "1"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = load_settings()
    serve = settings.serve
    applier = None
    if serve.replica:  # before the multi-process metrics variable: the applier serves its own /metrics
        from .replica import ApplierSupervisor

        applier = ApplierSupervisor().start()
    scratch = None
    if serve.workers > 1:
        scratch = tempfile.mkdtemp(prefix="mfli-serve-")
        os.environ[_MULTIPROC_ENV] = scratch
        os.environ[_LOCK_ENV] = str(Path(scratch) / "monitor.lock")
    if serve.replica:
        log.info("serving as a replica on http://%s:%d with %d worker(s); copies in %s", serve.host, serve.port,
                 serve.workers, settings.replication.data_dir)
    else:
        log.info("serving on http://%s:%d with %d worker(s); index %s, users %s", serve.host, serve.port,
                 serve.workers, settings.index.path, settings.learner.users_path)
    try:
        uvicorn.run("mfli.server.process:app_factory", factory=True, host=serve.host, port=serve.port,
                    workers=serve.workers, loop="uvloop", http=CoalescingHttpToolsProtocol, access_log=False,
                    log_level=settings.log_level.lower(), lifespan="on", timeout_graceful_shutdown=5)
    finally:
        if applier is not None:
            applier.stop()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0
