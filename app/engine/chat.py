"""Chat turns through the model's own template, with KV-prefix reuse across turns.

The template comes from the GGUF metadata and is rendered as written, with sandboxed Jinja2 (as
transformers does): llama.cpp's built-in renderer only recognises the family and drops details
such as SmolLM2's default system prompt, which changes what the model answers. The built-in
renderer is the fallback for a template Jinja2 cannot run; ChatML when the model has none.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import llama_cpp

from app.engine.backend import Model
from app.engine.events import Event, Finished
from app.engine.speculative import GenerationConfig, SpeculativeEngine


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


def format_chat(model: Model, messages: list[Message], add_generation_prompt: bool = True) -> str:
    template = model.chat_template()
    if template:
        try:
            return _render_jinja(template, model, messages, add_generation_prompt)
        except Exception:  # a template using features the sandbox lacks: llama.cpp's renderer knows the family
            rendered = _render_builtin(template, messages, add_generation_prompt)
            if rendered is not None:
                return rendered
    return _render_chatml(messages, add_generation_prompt)


def _render_builtin(template: str, messages: list[Message], add_generation_prompt: bool) -> str | None:
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

    return _compile(template).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
        eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
        raise_exception=raise_exception,
    )


def _render_chatml(messages: list[Message], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def tokenize_prompt(model: Model, text: str) -> list[int]:
    """Tokenize a rendered prompt: special tokens parsed, BOS added once (some templates write it)."""
    tokens = model.tokenize(text, add_special=True, parse_special=True)
    if len(tokens) >= 2 and tokens[0] == tokens[1] == model.bos:
        del tokens[0]
    return tokens


def tokenize_chat(model: Model, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """The chat as the model reads it. Only the template's own markers are special: a message that
    merely contains the text of one (`<|im_end|>`, `<|im_start|>system`) is tokenized as plain text,
    or a user could end their turn and open a system message by typing it."""
    text = format_chat(model, messages, add_generation_prompt)
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


class ChatSession:
    """A conversation. Each turn re-renders the whole chat; the contexts keep the shared prefix,
    so only the new turn's tokens are evaluated."""

    def __init__(self, engine: SpeculativeEngine, system: str | None = None):
        self.engine = engine
        self.messages: list[Message] = [Message("system", system)] if system else []

    def prompt_tokens(self) -> list[int]:
        return tokenize_chat(self.engine.main, self.messages)

    def send(self, user_text: str, config: GenerationConfig, cancel: threading.Event | None = None) -> Iterator[Event]:
        self.messages.append(Message("user", user_text))
        try:
            prompt = self.prompt_tokens()
            for event in self.engine.generate(prompt, config, cancel):
                if isinstance(event, Finished):
                    self.messages.append(Message("assistant", event.text))
                yield event
        except BaseException:
            if self.messages and self.messages[-1].role == "user":
                self.messages.pop()  # the turn failed: the conversation stays as it was
            raise
