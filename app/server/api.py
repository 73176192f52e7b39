"""The routes: OpenAI's `/v1` and LM Studio's `/api/v0` over one EngineHost.

Each request becomes a host job; its events come back through the job's queue. Streaming answers are
server-sent events in OpenAI's chunk format (sse-starlette does the framing). A client that goes away
has its job cancelled: the engine stops within one round and the next request starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.engine.catalog import ModelEntry, default_search_dirs, find_models
from app.engine.compat import metadata_compatibility
from app.engine.errors import ContextOverflowError, IncompatibleDraftError, ModelFileError, TandemError
from app.engine.events import Finished, RoundEvent
from app.engine.gguf_info import read_gguf_info
from app.engine.loading import LOOKUP, MTP, NO_DRAFT, SOURCES
from app.engine.rpc import WorkerLost, WorkerUnavailable
from app.engine.speculative import CONTEXT_FULL, MAX_TOKENS
from app.host import DONE, EngineHost, Job, JobFailed, PairLocked, QueueFull, resolve_spec, same_file
from app.server.requests import BadRequest, Parsed, Speculative, parse

MAX_BODY = 4 << 20  # bytes: a chat far longer than any context, far shorter than a memory problem
POLL = 0.25  # seconds between checks that a waiting client is still there
# A streaming client that reads nothing for this long while generation waits for it loses its stream, so
# that the clients queued behind it are served (host.READER_BACKLOG says when generation waits).
STREAM_READER_TIMEOUT = 10.0


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class Catalog:
    """The GGUF files the pickers find, by id (the file name without .gguf; a path is accepted too). A request may
    name only these: a server must not load any file on the disk a client names, unless its operator said so
    (`any_path`, tandem --serve --any-model-path)."""

    def __init__(self, dirs: list[str], any_path: bool = False):
        self.dirs, self.any_path = dirs, any_path
        self.entries: dict[str, ModelEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        found = [e for e in find_models(default_search_dirs(self.dirs)) if e.info is not None]
        self.entries = {}
        for entry in found:
            key = entry.path.stem
            if key in self.entries:  # the same name in two folders: the folder tells them apart
                key = f"{entry.path.parent.name}/{entry.path.stem}"
            self.entries[key] = entry

    def find(self, name: str) -> ModelEntry | None:
        for attempt in range(2):
            if name in self.entries:
                return self.entries[name]
            for entry in self.entries.values():
                if str(entry.path) == name or entry.path.name == name:
                    return entry
            if self.any_path and Path(name).suffix == ".gguf" and Path(name).is_file():
                self.entries[str(Path(name))] = ModelEntry(Path(name), read_gguf_info(Path(name)))
                return self.entries[str(Path(name))]
            if attempt == 0:
                self.refresh()  # a file added since the server started
        return None

    def id_of(self, path: Path) -> str:
        for key, entry in self.entries.items():
            if entry.path.resolve() == path.resolve():
                return key
        return path.stem


def _names(request: str, loaded: Path | None) -> bool:
    """The request names the file already loaded (by its path): always allowed, it is the server's own."""
    try:
        return loaded is not None and Path(request).suffix == ".gguf" and Path(request).resolve() == loaded.resolve()
    except OSError:
        return False


def _outside(name: str) -> str:
    if Path(name).suffix == ".gguf" and Path(name).is_file():
        return ": it is outside the model folders, and this server loads only what they hold (--models-dir adds one)"
    return ""


def create_app(host: EngineHost, api_key: str | None = None, dirs: list[str] | None = None, any_path: bool = False) -> Starlette:
    catalog = Catalog(dirs or [], any_path)
    started = int(time.time())

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235: "bearer KEY" is as good as "Bearer KEY"); the key is not
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
            raise BadRequest(f"the request body is larger than {MAX_BODY} bytes", status=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise BadRequest(f"the request body is larger than {MAX_BODY} bytes", status=413)
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None

    def loaded_id() -> str | None:
        return catalog.id_of(host.spec.main) if host.spec else None

    def model_list(lmstudio: bool) -> list[dict[str, Any]]:
        current = host.spec.main.resolve() if host.spec else None
        out = []
        for key, entry in catalog.entries.items():
            item: dict[str, Any] = {"id": key, "object": "model", "created": started, "owned_by": "tandem"}
            if lmstudio:
                info = entry.info
                item |= {
                    "type": "llm", "publisher": "local", "arch": info.architecture if info else "unknown",
                    "compatibility_type": "gguf", "quantization": info.quantization if info else "unknown",
                    "state": "loaded" if current is not None and entry.path.resolve() == current else "not-loaded",
                    "max_context_length": int((info.metadata.get(f"{info.architecture}.context_length") or 0) if info else 0),
                }  # fmt: skip
            out.append(item)
        if host.spec is not None and not any(entry.path.resolve() == current for entry in catalog.entries.values()):
            out.insert(0, {"id": loaded_id(), "object": "model", "created": started, "owned_by": "tandem"})
        return out

    async def health(request: Request) -> JSONResponse:
        body = {"status": host.state, "model": loaded_id(), "draft": host.spec.draft if host.spec else None,
                "queued": host.queued, "served": host.served}  # fmt: skip
        if host.state == "failed":
            body["error"] = host.load_error
        return JSONResponse(body, status_code=200 if host.state == "ready" else 503)

    async def models(request: Request) -> JSONResponse:
        if not authorised(request):
            return error(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error")
        return JSONResponse({"object": "list", "data": model_list(lmstudio=request.url.path.startswith("/api/v0"))})

    def resolve(parsed: Parsed) -> tuple[str | None, str | None]:
        """The request's model and draft as paths (404 for an unknown model, 400 for an unusable draft)."""
        main = None
        if parsed.model and parsed.model != loaded_id() and not _names(parsed.model, host.spec.main if host.spec else None):
            entry = catalog.find(parsed.model)
            if entry is None:
                raise BadRequest(f"model '{parsed.model}' not found (GET /v1/models lists them){_outside(parsed.model)}",
                                 "model", 404, "not_found_error")  # fmt: skip
            main = str(entry.path)
        draft = _mode_draft(parsed, host, main)
        if draft is not None and draft not in SOURCES and not _names(draft, host.spec.draft_path if host.spec else None):
            entry = catalog.find(draft)
            if entry is None:
                raise BadRequest(f"draft model '{draft}' not found{_outside(draft)}", "draft_model", 404, "not_found_error")
            main_path = Path(main) if main else (host.spec.main if host.spec else None)
            if main_path is not None and entry.info is not None:
                verdict = metadata_compatibility(read_gguf_info(main_path), entry.info)
                if not verdict.ok:
                    raise BadRequest(f"draft model '{draft}' cannot be used with {main_path.name}: {verdict.reason}", "draft_model")
            draft = str(entry.path)
        return main, draft

    async def generate(request: Request, chat: bool, lmstudio: bool):
        if not authorised(request):
            return error(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error")
        try:
            parsed = parse(await read_json(request), host.config.settings, chat)
            main, draft = resolve(parsed)
            job = Job(parsed.config, messages=parsed.messages, prompt=parsed.prompt, main=main, draft=draft,
                      reader_timeout=STREAM_READER_TIMEOUT if parsed.stream else None)  # fmt: skip
            arrived = asyncio.Event()
            loop = asyncio.get_running_loop()
            job.wake = lambda: loop.call_soon_threadsafe(arrived.set)  # one wake-up per round, from the worker
            host.submit(job)
        except BadRequest as exc:
            return error(exc.status, exc.message, exc.kind, exc.param)
        except QueueFull as exc:
            return error(503, str(exc), "server_busy", headers={"Retry-After": "5"})
        except WorkerLost as exc:  # the pair is gone until a restart: health says so too
            return failure(exc)
        shape = Shape(chat, lmstudio, parsed.model or loaded_id() or "tandem", parsed.speculative)
        if parsed.stream:
            return EventSourceResponse(stream(request, job, arrived, shape, parsed.include_usage), ping=15)
        events = [event async for event in wait_for(request, job, arrived)]
        for event in events:
            if isinstance(event, JobFailed):
                return failure(event.error)
        finished = next((e for e in events if isinstance(e, Finished)), None)
        if finished is None:  # the client left: nobody reads this
            return error(499, "the client went away", "cancelled")
        shape.model = loaded_id() or shape.model
        return JSONResponse(shape.complete(finished))

    async def stream(
        request: Request, job: Job, arrived: asyncio.Event, shape: Shape, include_usage: bool
    ) -> AsyncIterator[dict[str, str]]:
        sent_role = False
        try:
            async for event in wait_for(request, job, arrived):
                if isinstance(event, JobFailed):
                    body = {"error": {"message": str(event.error), "type": _kind(event.error), "param": None, "code": None}}
                    yield {"data": json.dumps(body)}
                    return
                if not sent_role:
                    shape.model = loaded_id() or shape.model
                    yield {"data": json.dumps(shape.chunk(role=True))}
                    sent_role = True
                if isinstance(event, RoundEvent) and event.text:
                    yield {"data": json.dumps(shape.chunk(text=event.text))}
                elif isinstance(event, Finished):
                    if event.tail:
                        yield {"data": json.dumps(shape.chunk(text=event.tail))}
                    yield {"data": json.dumps(shape.chunk(finish=finish_reason(event), finished=event))}
                    if include_usage:
                        yield {"data": json.dumps(shape.usage_chunk(event))}
            yield {"data": "[DONE]"}
        finally:
            job.cancel.set()  # a closed connection ends here too: stop the engine within one round

    async def wait_for(request: Request, job: Job, arrived: asyncio.Event) -> AsyncIterator[Any]:
        """The job's events as they come; cancels it if the client disconnects while waiting."""
        done = False
        try:
            while True:
                try:
                    item = job.take()
                except queue.Empty:
                    arrived.clear()
                    if not job.events.empty():
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), POLL)
                        continue
                    if await request.is_disconnected():  # checked a few times a second, not per token
                        job.cancel.set()
                    continue
                if item is DONE:
                    done = True
                    return
                yield item
        finally:
            if not done:  # the reader stopped early (a closed stream): nobody wants the rest
                job.cancel.set()

    async def metrics(request: Request) -> Response:
        if not authorised(request):
            return error(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error")
        from app.server.metrics import CONTENT_TYPE, exposition

        return Response(exposition(host), media_type=CONTENT_TYPE)

    def endpoint(chat: bool, lmstudio: bool):
        async def handle(request: Request):
            return await generate(request, chat, lmstudio)

        return handle

    routes = [
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", models),
        Route("/api/v0/models", models),
        Route("/v1/chat/completions", endpoint(chat=True, lmstudio=False), methods=["POST"]),
        Route("/v1/completions", endpoint(chat=False, lmstudio=False), methods=["POST"]),
        Route("/api/v0/chat/completions", endpoint(chat=True, lmstudio=True), methods=["POST"]),
        Route("/api/v0/completions", endpoint(chat=False, lmstudio=True), methods=["POST"]),
    ]

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error(404, f"no route {request.method} {request.url.path}", "not_found_error")

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error")

    async def crashed(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to the client
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed, Exception: crashed})


def _mode_draft(parsed: Parsed, host: EngineHost, main: str | None) -> str | None:
    """The draft a request asks for: `draft_model` (LM Studio's), or `speculative.mode`, which must agree with it."""
    mode = parsed.speculative.mode if parsed.speculative else "auto"
    draft = parsed.draft_model
    if mode in (LOOKUP, NO_DRAFT, MTP):
        if draft is not None and draft != mode:
            raise BadRequest(f"'speculative.mode' is {mode!r} but 'draft_model' names {draft!r}", "speculative.mode")
        return mode
    if mode == "model" and draft in (None, *SOURCES):
        loaded = host.spec
        if draft is None and loaded is not None and loaded.draft_path is not None and (main is None or same_file(main, str(loaded.main))):
            return str(loaded.draft_path)  # the loaded pair's draft model
        main_path = main or (str(loaded.main) if loaded else host.config.main)
        spec = resolve_spec(host.config, main_path) if main_path else None
        if draft is not None or spec is None or spec.draft_path is None:
            raise BadRequest("'speculative.mode' is 'model' but no draft model goes with this model: name one with "
                             "'draft_model'", "speculative.mode")  # fmt: skip
        return str(spec.draft_path)
    return draft


def _kind(exc: TandemError) -> str:
    if isinstance(exc, ContextOverflowError | IncompatibleDraftError):
        return "invalid_request_error"
    if isinstance(exc, ModelFileError):
        return "not_found_error"
    return "server_error"


def failure(exc: TandemError) -> JSONResponse:
    if isinstance(exc, PairLocked):  # the chat app decides what is loaded: the request cannot change it
        return error(409, str(exc), "invalid_request_error")
    if isinstance(exc, WorkerUnavailable | WorkerLost):  # a worker, not the request, is at fault
        return error(503, str(exc), "server_error")
    status = 400 if isinstance(exc, ContextOverflowError | IncompatibleDraftError) else 404 if isinstance(exc, ModelFileError) else 500
    return error(status, str(exc), _kind(exc))


def finish_reason(finished: Finished) -> str:
    return "length" if finished.stats.stop_reason in (MAX_TOKENS, CONTEXT_FULL) else "stop"


class Shape:
    """OpenAI's response objects (chat or text completion), with LM Studio's `stats` on /api/v0."""

    def __init__(self, chat: bool, lmstudio: bool, model: str, speculative: Speculative | None = None):
        self.chat, self.lmstudio, self.model, self.speculative = chat, lmstudio, model, speculative
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, streaming: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if streaming and self.chat else ""), "created": self.created, "model": self.model}

    @staticmethod
    def usage(finished: Finished) -> dict[str, int]:
        prompt, completion = finished.stats.prompt_tokens_count, finished.stats.predicted_tokens_count
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def complete(self, finished: Finished) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}, "finish_reason": finish_reason(finished)}
        else:
            choice = {"index": 0, "text": finished.text, "logprobs": None, "finish_reason": finish_reason(finished)}
        body = self._head(False) | {"choices": [choice], "usage": self.usage(finished)}
        if self.lmstudio:
            body["stats"] = self.stats(finished)
        return body

    def stats(self, finished: Finished) -> dict[str, Any]:
        """LM Studio's `stats`, with the request's `speculative` object as it was applied."""
        stats = finished.stats.as_dict()
        if self.speculative is not None:
            stats["speculative"] = self.speculative.echo() | {"used": finished.stats.draft_model or "none"}
        return stats

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None, finished: Finished | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = self._head(True) | {"choices": [choice]}
        if self.lmstudio and finished is not None:
            body["stats"] = self.stats(finished)
        return body

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        return self._head(True) | {"choices": [], "usage": self.usage(finished)}

