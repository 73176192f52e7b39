"""Chat turns through the model's own template, with KV-prefix reuse across turns.

The template comes from the GGUF metadata and is rendered as written, with sandboxed Jinja2 (as
transformers does) and a bound on time: llama.cpp's built-in renderer only recognises the family and drops
details such as SmolLM2's default system prompt, which changes what the model answers. The built-in
renderer is the fallback for a template Jinja2 cannot run, ChatML the last; either is reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import itertools
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import llama_cpp

from app.engine.backend import Model
from app.engine.errors import TandemError
from app.engine.events import EarlierMessagesLeftOut, Event, Finished, TemplateFallback
from app.engine.speculative import GenerationConfig, SpeculativeEngine


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


# A chat template renders in milliseconds, even over a long conversation; one still running after this loops.
TEMPLATE_SECONDS = 5.0


class TemplateTooSlow(TandemError):
    """The model's chat template did not finish rendering within TEMPLATE_SECONDS."""


@dataclass(frozen=True)
class RenderedChat:
    text: str
    fallback: TemplateFallback | None = None  # set when the model's own template was not what rendered it


def format_chat(model: Model, messages: list[Message], add_generation_prompt: bool = True) -> str:
    return render_chat(model, messages, add_generation_prompt).text


def render_chat(model: Model, messages: list[Message], add_generation_prompt: bool = True) -> RenderedChat:
    """The chat through the model's template; where that fails, through llama.cpp's built-in template for
    the same format (recognised from the template's text, or from the model's architecture and name), and
    ChatML last. A fallback is reported (RenderedChat.fallback), never silent: it can drop a system prompt."""
    template = model.chat_template()
    if template:
        try:
            return RenderedChat(_render_jinja(template, model, messages, add_generation_prompt))
        except TemplateTooSlow:
            raise
        except Exception as exc:  # invalid Jinja, a feature the sandbox refuses, the template's raise_exception
            reason = f"its chat template failed: {_first_line(exc)}"
    else:
        reason = "it has no chat template"
    for name in ([template] if template else []) + _builtin_names_for(model):
        rendered = _render_builtin(name, messages, add_generation_prompt)
        if rendered is not None:
            used = "llama.cpp's built-in template" + ("" if name == template else f" '{name}'")
            return RenderedChat(rendered, TemplateFallback(model.path.name, reason, used))
    rendered = _render_chatml(messages, add_generation_prompt)
    return RenderedChat(rendered, TemplateFallback(model.path.name, reason, "ChatML"))


_reported: set[tuple[str, str]] = set()


def _first_report(fallback: TemplateFallback) -> TemplateFallback:
    """The fallback, `first` only the first time this model falls back for this reason in this process (a chat
    need not say it every turn). Decided once per turn, where the turn's notices are made, not per rendering."""
    key = (fallback.model, fallback.reason)
    first = key not in _reported
    _reported.add(key)
    return dataclasses.replace(fallback, first=first)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


@functools.cache
def builtin_templates() -> tuple[str, ...]:
    """The names of llama.cpp's built-in chat templates ("chatml", "llama3", "gemma", "phi3"...)."""
    count = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return tuple(name.decode() for name in names if name)


def _builtin_names_for(model: Model) -> list[str]:
    """Built-in templates whose name the model's architecture or name contains ("Meta Llama 3.1" -> llama3,
    gemma2 -> gemma), longest first; none for a family llama.cpp has no template for (ChatML follows)."""
    squeeze = functools.partial(re.sub, r"[^a-z0-9]", "")
    described = [squeeze(str(text).lower()) for text in (model.info.architecture, model.info.metadata.get("general.name", ""))]
    names = [name for name in builtin_templates() if name != "chatml" and any(squeeze(name) in d for d in described)]
    return sorted(names, key=len, reverse=True)


def _render_builtin(template: str, messages: list[Message], add_generation_prompt: bool) -> str | None:
    """llama.cpp's renderer: `template` is a template's text (its family is recognised from it) or a name."""
    encoded = [(m.role.encode(), m.content.encode()) for m in messages]
    chat = (llama_cpp.llama_chat_message * len(messages))()
    for slot, (role, content) in zip(chat, encoded, strict=True):
        slot.role, slot.content = role, content
    size = 256 + 2 * sum(len(c) for _, c in encoded)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt, buf, size)
        if n < 0:
            return None  # not a template llama.cpp recognises
        if n <= size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n
    return None


@functools.lru_cache(maxsize=8)
def _compile(template: str):  # -> jinja2.Template; compiling costs milliseconds, a chat renders every turn
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def _render_jinja(template: str, model: Model, messages: list[Message], add_generation_prompt: bool) -> str:
    def raise_exception(message: str) -> None:
        raise ValueError(message)

    compiled = _compile(template)
    with _time_bound(model):
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
            eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
            raise_exception=raise_exception,
        )


@contextlib.contextmanager
def _time_bound(model: Model) -> Iterator[None]:
    """Stop a template that runs past TEMPLATE_SECONDS. Jinja compiles a template to Python code (file name
    "<template>"); a trace on this thread, for that code only, checks the clock at each of its lines and raises
    there (Jinja's sandbox already caps each range() at 100,000 items, but not loops inside loops)."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateTooSlow(
                f"{model.path.name}: its chat template was still rendering after {TEMPLATE_SECONDS:g} s (it loops);"
                " use another build of this model, or send raw text (--raw, /v1/completions)"
            )
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _render_chatml(messages: list[Message], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def tokenize_prompt(model: Model, text: str) -> list[int]:
    """Tokenize a rendered prompt: special tokens parsed, BOS added once (some templates write it)."""
    tokens = model.tokenize(text, add_special=True, parse_special=True)
    if len(tokens) >= 2 and tokens[0] == tokens[1] == model.bos:
        del tokens[0]
    return tokens


def tokenize_chat(
    model: Model, messages: list[Message], add_generation_prompt: bool = True, rendered: RenderedChat | None = None
) -> list[int]:
    """The chat as the model reads it. Only the template's own markers are special: a message that
    merely contains the text of one (`<|im_end|>`, `<|im_start|>system`) is tokenized as plain text,
    or a user could end their turn and open a system message by typing it."""
    text = (rendered or render_chat(model, messages, add_generation_prompt)).text
    suspicious = {m.content for m in messages if m.content and _has_special_text(model, m.content)}
    if not suspicious:
        return tokenize_prompt(model, text)
    spans: list[tuple[int, int]] = []  # where the suspicious contents sit in the rendered text, in order
    cursor = 0
    for message in messages:
        for content in (message.content, message.content.strip()):  # templates may trim a message
            at = text.find(content, cursor) if content else -1
            if at >= 0:
                if message.content in suspicious:
                    spans.append((at, at + len(content)))
                cursor = at + len(content)
                break
    tokens: list[int] = []
    start = 0
    for begin, end in [*spans, (len(text), len(text))]:
        if begin > start:  # template text (and ordinary messages): its markers are the real ones
            tokens += model.tokenize(text[start:begin], add_special=not tokens and start == 0, parse_special=True)
        if end > begin:
            tokens += model.tokenize(text[begin:end], add_special=False, parse_special=False)
        start = end
    if len(tokens) >= 2 and tokens[0] == tokens[1] == model.bos:
        del tokens[0]
    return tokens


def _has_special_text(model: Model, content: str) -> bool:
    return model.tokenize(content, add_special=False, parse_special=True) != model.tokenize(
        content, add_special=False, parse_special=False
    )


# No token covers more characters than this (long runs of spaces or dashes do come close): a conversation's
# oldest messages beyond budget x this many characters cannot fit and are never rendered or tokenized.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class ChatWindow:
    """Where the model's reading of a long conversation starts (an index into its messages, the leading system
    message not counted). It stays put from turn to turn, so the context's cached prefix stays valid, and moves
    only when the conversation outgrows the context: then far enough to leave a quarter of it free again."""

    start: int = 0


@dataclass(frozen=True)
class FittedChat:
    tokens: list[int]
    rendered: RenderedChat
    left_out: int  # the oldest messages the model does not read this turn

    def notices(self, total: int) -> list[TemplateFallback | EarlierMessagesLeftOut]:
        """What a front-end should say before the reply (total: the conversation's messages)."""
        fallback = self.rendered.fallback
        said: list[TemplateFallback | EarlierMessagesLeftOut] = [_first_report(fallback)] if fallback else []
        return said + ([EarlierMessagesLeftOut(self.left_out, total)] if self.left_out else [])


def read_chat(model: Model, messages: list[Message], left_out: int = 0) -> FittedChat:
    """`messages` as the model reads them (they are what is left after the `left_out` oldest)."""
    rendered = render_chat(model, messages)
    return FittedChat(tokenize_chat(model, messages, rendered=rendered), rendered, left_out)


def fit_chat(model: Model, messages: list[Message], n_ctx: int, reserve: int, window: ChatWindow | None = None) -> FittedChat:
    """The chat's prompt, leaving `reserve` tokens of the context for the reply: the system message and as many
    of the latest turns as fit (a conversation may be longer than any context: reopened, or simply long)."""
    window = window if window is not None else ChatWindow()
    head = messages[:1] if messages and messages[0].role == "system" else []
    body = messages[len(head) :]
    starts = [i for i, m in enumerate(body) if m.role == "user"] or [0]  # a reading starts at a question
    suffix_chars = [*list(itertools.accumulate(len(m.content) for m in reversed(body)))[::-1], 0]

    def attempt(start: int, budget: int) -> FittedChat | None:
        if suffix_chars[start] > budget * MAX_CHARS_PER_TOKEN:
            return None  # too long to fit, whatever its tokens: not worth rendering
        fitted = read_chat(model, head + body[start:], start)
        return fitted if len(fitted.tokens) <= budget else None

    budget = n_ctx - reserve
    current = window.start if window.start in starts else starts[0]
    fitted = attempt(current, budget)
    if fitted is None:  # move the start: the earliest question from which the rest fits in 3/4 of the budget
        later = [s for s in starts if s > current]
        low, high = 0, len(later) - 1
        while low <= high:
            middle = (low + high) // 2
            found = attempt(later[middle], budget * 3 // 4)
            if found is not None:
                fitted, high = found, middle - 1
            else:
                low = middle + 1
        if fitted is None:  # nothing fits in 3/4: the longest suffix that fits the whole budget, if any
            fitted = next((f for s in later if (f := attempt(s, budget)) is not None), None)
        if fitted is None:  # even the last question alone does not fit: the engine says so (ContextOverflowError);
            return read_chat(model, head + body[starts[-1] :], starts[-1])  # the window stays, for a shorter question
    window.start = fitted.left_out
    return fitted


def reply_reserve(config: GenerationConfig, n_ctx: int) -> int:
    """Context kept free for the reply when a conversation is fitted: its token limit, at most a quarter."""
    return min(config.max_tokens, n_ctx // 4)


class ChatSession:
    """A conversation. Each turn re-renders the chat; the contexts keep the shared prefix, so only the new
    turn's tokens are evaluated. A conversation longer than the context is read from its latest turns."""

    def __init__(self, engine: SpeculativeEngine, system: str | None = None):
        self.engine = engine
        self.messages: list[Message] = [Message("system", system)] if system else []
        self.window = ChatWindow()

    def prompt_tokens(self) -> list[int]:
        return tokenize_chat(self.engine.main, self.messages)

    def send(
        self, user_text: str, config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[Event | TemplateFallback | EarlierMessagesLeftOut]:
        """The reply's events; first a TemplateFallback when the model's own template did not render the chat,
        and EarlierMessagesLeftOut when the model reads only the latest turns."""
        self.messages.append(Message("user", user_text))
        try:
            engine = self.engine
            fitted = fit_chat(engine.main, self.messages, engine.n_ctx, reply_reserve(config, engine.n_ctx), self.window)
            yield from fitted.notices(len(self.messages))
            for event in engine.generate(fitted.tokens, config, cancel):
                if isinstance(event, Finished):
                    self.messages.append(Message("assistant", event.text))
                yield event
        except BaseException:
            if self.messages and self.messages[-1].role == "user":
                self.messages.pop()  # the turn failed: the conversation stays as it was
            raise
