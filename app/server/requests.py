"""Request bodies checked field by field, so a bad request gets a 400 that names the field (OpenAI's error
shape), never a 500. Sampling defaults come from the server's settings (--temp and friends)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.engine.chat import Message
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig

ROLES = ("system", "user", "assistant")
# OpenAI fields this server does not implement, with the values that ask for nothing (sent by some clients
# as defaults). Any other value is a 400 naming the field: never a 200 that silently ignored it.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
}  # fmt: skip


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


SPECULATIVE_MODES = ("auto", "model", "mtp", "lookup", "none")  # auto: the model's default draft, adaptive


@dataclass(frozen=True)
class Speculative:
    """A request's `speculative` object: how to draft for it (echoed in its `stats`)."""

    mode: str
    draft_max: int
    draft_min: int
    draft_p_min: float

    def echo(self) -> dict[str, object]:
        return {"mode": self.mode, "draft_max": self.draft_max, "draft_min": self.draft_min, "draft_p_min": self.draft_p_min}


@dataclass
class Parsed:
    config: GenerationConfig
    stream: bool
    include_usage: bool
    model: str | None
    draft_model: str | None  # None: the model's default draft
    messages: list[Message] | None = None
    prompt: str | None = None
    speculative: Speculative | None = None


def _number(body: dict, name: str, default: float, low: float, high: float | None = None, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise BadRequest(f"'{name}' must be {bounds}, got {value!r}", name)
    return int(value) if integer else float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        return tuple(s for s in stop if s)
    raise BadRequest("'stop' must be a string or a list of at most 16 strings", "stop")


def _optional_text(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' must be a non-empty string", name)
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text is understood."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where} must be a string", where)


def parse(body: Any, settings: Settings, chat: bool) -> Parsed:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == h and type(value) is type(h) for h in harmless):
            raise BadRequest(f"'{name}' is not supported by this server (got {json.dumps(value)[:80]})", name)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"'seed' must be an integer, got {seed!r}", "seed")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampler = SamplerSettings(
        temperature=_number(body, "temperature", settings.temperature, 0.0, 100.0),
        top_k=_number(body, "top_k", settings.top_k, 0, None, integer=True),
        top_p=_number(body, "top_p", settings.top_p, 0.0, 1.0),
        min_p=_number(body, "min_p", settings.min_p, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", settings.repeat_penalty, 1e-6, 100.0),
        seed=seed if seed is not None else (None if settings.seed < 0 else settings.seed),
    )
    speculative = _speculative(body, settings)
    drafting = speculative or Speculative("auto", settings.draft_max, settings.draft_min, settings.draft_p_min)
    config = GenerationConfig(
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", settings.max_tokens, 1, 1 << 20, integer=True),
        draft_max=drafting.draft_max, draft_min=drafting.draft_min, draft_p_min=drafting.draft_p_min,
        stop=_stop(body), sampler=sampler, adaptive=settings.adaptive,
    )  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    parsed = Parsed(config, stream, bool(options.get("include_usage")), _optional_text(body, "model"), _draft(body),
                    speculative=speculative)  # fmt: skip
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list", "messages")
        parsed.messages = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise BadRequest(f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}", f"messages[{i}]")
            parsed.messages.append(Message(message["role"], _content(message.get("content"), f"messages[{i}].content")))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        parsed.prompt = prompt
    return parsed


def _speculative(body: dict, settings: Settings) -> Speculative | None:
    """`speculative`: {"mode": auto|model|mtp|lookup|none, "draft_max", "draft_min", "draft_p_min"}, each optional,
    within the same limits as the settings (Settings.LIMITS); the server's settings fill what is left out."""
    value = body.get("speculative")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'speculative' must be an object", "speculative")
    fields = {"mode": None, "draft_max": True, "draft_min": True, "draft_p_min": False}  # name -> integer?
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise BadRequest(f"'speculative.{unknown[0]}' is not a field of 'speculative' ({', '.join(fields)})", f"speculative.{unknown[0]}")
    mode = value.get("mode", "auto")
    if mode not in SPECULATIVE_MODES:
        raise BadRequest(f"'speculative.mode' must be one of {', '.join(SPECULATIVE_MODES)}, got {mode!r}", "speculative.mode")
    numbers: dict[str, Any] = {}
    for name, integer in fields.items():
        if integer is None:
            continue
        low, high = Settings.LIMITS[name]
        default = getattr(settings, name)
        if name == "draft_min" and "draft_max" in numbers:  # a smaller draft_max alone lowers the server's minimum
            default = min(default, numbers["draft_max"])
        try:
            numbers[name] = _number(value, name, default, low or 0, high, integer=integer)
        except BadRequest as exc:
            raise BadRequest(exc.message.replace(f"'{name}'", f"'speculative.{name}'"), f"speculative.{name}") from None
    if numbers["draft_min"] > numbers["draft_max"]:
        raise BadRequest("'speculative.draft_min' must not be more than draft_max", "speculative.draft_min")
    return Speculative(mode, **numbers)


def _draft(body: dict) -> str | None:
    """LM Studio's `draft_model`: a path or a model id, "mtp", "lookup", or "none"/"" for plain decoding."""
    if "draft_model" not in body or body["draft_model"] is None:
        return None
    value = body["draft_model"]
    if not isinstance(value, str):
        raise BadRequest("'draft_model' must be a string", "draft_model")
    return value or "none"
