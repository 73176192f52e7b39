"""Tandem's engine over HTTP: OpenAI-compatible `/v1` and LM Studio-style `/api/v0` (with `draft_model` and
speculative-decoding `stats`). Headless: never imports Textual. Run by `tandem --serve`."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

from app.config import Config

if TYPE_CHECKING:
    from app.host import EngineHost

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5001  # KoboldCpp's port: front-ends that know it find us there
DEFAULT_PARALLEL = 4  # --serve's sequences unless --parallel says: llama-server's auto -np (4, one shared KV pool)


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """A server other machines can reach, with no key: anyone there can use it. (Loopback only: no warning.)"""
    from app.engine.rpc import is_loopback

    if api_key or is_loopback(host):
        return None
    return (f"warning: {host}:{port} can be reached from other machines and no --api-key is set: "
            "anyone on the network can use this server and load models on it")  # fmt: skip


def base_url(host: str, port: int) -> str:
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


SEND_BUFFER = 16 * 1024  # bytes (Linux doubles it for bookkeeping): token streams need little; a stall shows soon


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound and listening: connections wait in the backlog from here, even before uvicorn's loop runs, so
    the URL can be announced at once. OSError when the address cannot be had."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop (TIME_WAIT)
        # Connections inherit a small send buffer: a stream whose client stops reading fills it in a few
        # hundred chunks rather than megabytes, so the host sees the stall (api.STREAM_READER_TIMEOUT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """The HTTP API over an EngineHost, served on a daemon thread (the chat app's F9). The port is bound
    before anything starts, so a port in use is an OSError the caller reports, not a dead thread; port 0
    takes a free one (`port` then says which). Uvicorn's log stays out of the terminal the app draws on."""

    def __init__(self, engine_host: EngineHost, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 api_key: str | None = None, dirs: list[str] | None = None, owns_host: bool = True):  # fmt: skip
        self.engine_host, self.host, self.port = engine_host, host, port
        # False: the host is a front-end's (the chat app's), running before and after; stop() then cancels the
        # requests only and leaves the host (and the front-end's own turn) alone
        self.owns_host = owns_host
        self.api_key, self.dirs = api_key, dirs
        self.server = None  # uvicorn.Server once started
        self._thread: threading.Thread | None = None
        self._stopping = False  # stop() came (perhaps while start() was still binding, on another thread)

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def start(self, timeout: float = 10.0) -> None:
        """Bind, listen and start answering; OSError when the address cannot be had (the host is not started then)."""
        import uvicorn

        from app.server.api import create_app

        logging.getLogger("uvicorn").addHandler(logging.NullHandler())  # no stray lines over a full-screen app
        sock = listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        try:
            app = create_app(self.engine_host, api_key=self.api_key, dirs=self.dirs)  # lists the model folders
        except BaseException:
            sock.close()
            raise
        config = uvicorn.Config(app, loop="asyncio", http="h11", ws="none", lifespan="off", log_config=None,
                                log_level="warning", access_log=False, timeout_graceful_shutdown=2)  # fmt: skip
        self.server = server = uvicorn.Server(config)
        if self._stopping:  # stopped while binding: serve nothing
            sock.close()
            raise OSError("the server was stopped before it started")
        self.engine_host.start()

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except SystemExit:  # uvicorn's way of saying it could not start
                pass
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name="tandem-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.005)

    def stop(self, timeout: float | None = 30) -> None:
        """Stop listening, cancel what is running or queued, wait for the worker: when this returns (with no
        timeout) nothing of the server touches the engine any more. An adopted engine stays open."""
        self._stopping = True
        if self.server is not None:
            self.server.should_exit = True
        if self.owns_host:
            self.engine_host.stop(timeout=timeout)  # the handlers waiting on jobs get their DONE at once
        else:  # the requests end within a round; the front-end's host goes on
            self.engine_host.cancel_requests()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.engine_host.requests_pending() and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.01)
        if self._thread is not None:
            self._thread.join(timeout=10)


def serve(
    config: Config,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_queue: int = 16,
    api_key: str | None = None,
    log: TextIO = sys.stderr,
    any_path: bool = False,  # requests may load any GGUF file by path, not only the catalog's
    parallel: int | None = None,  # requests generated together (--parallel); None: DEFAULT_PARALLEL
) -> int:
    import uvicorn

    from app.engine.events import TemplateFallback
    from app.host import EngineHost
    from app.server.api import create_app

    parallel = parallel or DEFAULT_PARALLEL

    try:
        sock = listening_socket(host, port)
    except OSError:
        log.write(f"tandem: error: could not listen on {host}:{port} (in use, or not an address of this machine)\n")
        return 1
    port = sock.getsockname()[1]  # port 0 took a free one
    url = base_url(host, port)

    def ready(_engine) -> None:
        log.write(f"tandem: ready: {engine_host.describe()}, {parallel} at once, at {url}/v1 (LM Studio API at {url}/api/v0)\n")
        log.flush()

    def failed(reason: str) -> None:
        log.write(f"tandem: could not load the models: {reason} (the server still answers; a request may name other models)\n")
        log.flush()

    def observe(_job, item: object) -> None:  # on the worker thread: one line, once per model and reason
        if isinstance(item, TemplateFallback) and item.first:
            log.write(f"tandem: {item.sentence()}\n")
            log.flush()

    engine_host = EngineHost(config, max_queue=max_queue, on_ready=ready, on_event=observe, parallel=parallel, on_failed=failed)
    app = create_app(engine_host, api_key=api_key, dirs=config.dirs, any_path=any_path)
    # explicit loop and protocol: no implementation picked by import at run time (the one-file binary has these)
    server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", http="h11", ws="none", lifespan="off", log_level="warning",
                                           access_log=False))  # fmt: skip
    log.write(f"tandem: serving on {url} (loading the models; {url}/health says when they are ready)\n")
    warning = exposure_warning(host, port, api_key)
    if warning:
        log.write(f"tandem: {warning}\n")
    log.flush()
    engine_host.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine_host.stop()
        sock.close()
    return 0
