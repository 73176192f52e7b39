"""Tandem's engine over HTTP: OpenAI-compatible `/v1` and LM Studio-style `/api/v0` (with `draft_model` and
speculative-decoding `stats`). Headless: never imports Textual. Run by `tandem --serve`."""

from __future__ import annotations

import sys
from typing import TextIO

from app.config import Config

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5001  # KoboldCpp's port: front-ends that know it find us there


def serve(
    config: Config,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_queue: int = 16,
    api_key: str | None = None,
    log: TextIO = sys.stderr,
) -> int:
    import uvicorn

    from app.host import EngineHost
    from app.server.api import create_app

    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def ready(_engine) -> None:
        log.write(f"tandem: ready: {engine_host.describe()} at {url}/v1 (LM Studio API at {url}/api/v0)\n")
        log.flush()

    engine_host = EngineHost(config, max_queue=max_queue, on_ready=ready)
    app = create_app(engine_host, api_key=api_key, dirs=config.dirs)
    # explicit loop and protocol: no implementation picked by import at run time (the one-file binary has these)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, loop="asyncio", http="h11", ws="none",
                                           lifespan="off", log_level="warning", access_log=False))  # fmt: skip
    log.write(f"tandem: serving on {url} (loading the models; {url}/health says when they are ready)\n")
    log.flush()
    engine_host.start()
    try:
        server.run()
    finally:
        engine_host.stop()
    if not server.started:
        log.write(f"tandem: error: could not listen on {host}:{port} (in use, or not an address of this machine)\n")
        return 1
    return 0
