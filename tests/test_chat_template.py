"""Chat templates that fail, loop or are missing: a fallback is said, a loop is stopped with one clear line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.engine import chat
from app.engine.backend import Model
from app.engine.chat import Message, TemplateTooSlow, render_chat
from tests import tiny_models

ROOT = Path(__file__).resolve().parents[1]
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
RAISES = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
INVALID = "{% if messages %}{{ messages[0]['content'] }"
HELLO = [Message("system", "Answer briefly."), Message("user", "hello")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    weights = tiny_models.random_weights(seed=1, n_vocab=tiny_models.n_vocab())
    made = {
        "loops": ("tiny loops", LOOPS),
        "llama3": ("Meta Llama 3 tiny", RAISES),
        "invalid": ("tiny invalid", INVALID),
        "none": ("tiny none", None),
    }
    return {key: tiny_models.write_model(root / f"{key}.gguf", weights, name=name, chat_template=template)
            for key, (name, template) in made.items()}  # fmt: skip


def headless(model: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    args = ["--model", str(model), "--no-draft", "-t", "2", "-c", "256", "--temp", "0", "-n", "4", "--prompt", "hello"]
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_template_that_raises_falls_back_to_llama_cpps_template_for_the_model_and_says_so(models) -> None:
    model = Model(models["llama3"], n_gpu_layers=0)
    try:
        rendered = render_chat(model, HELLO)
    finally:
        model.close()
    assert "<|start_header_id|>system<|end_header_id|>" in rendered.text and "Answer briefly." in rendered.text
    assert rendered.fallback is not None and rendered.fallback.used == "llama.cpp's built-in template 'llama3'"
    assert "Conversation roles must alternate" in rendered.fallback.reason


@pytest.mark.parametrize("key, reason", [("invalid", "its chat template failed: TemplateSyntaxError"),
                                         ("none", "it has no chat template")])  # fmt: skip
def test_a_broken_or_missing_template_is_written_as_chatml_and_said(models, key, reason) -> None:
    model = Model(models[key], n_gpu_layers=0)
    try:
        rendered = render_chat(model, HELLO)
    finally:
        model.close()
    assert rendered.text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert rendered.fallback is not None and rendered.fallback.used == "ChatML" and rendered.fallback.reason.startswith(reason)


def test_the_headless_cli_says_a_fallback_on_stderr_and_still_answers(models) -> None:
    result = headless(models["llama3"])
    assert result.returncode == 0, result.stderr
    assert "tandem: warning: llama3.gguf: its chat template failed: ValueError: Conversation roles" in result.stderr
    assert "built-in template 'llama3'" in result.stderr


def test_a_looping_template_is_stopped_with_one_clear_line(models, monkeypatch) -> None:
    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.3)
    model = Model(models["loops"], n_gpu_layers=0)
    try:
        started = time.monotonic()
        with pytest.raises(TemplateTooSlow, match=r"still rendering after 0\.3 s"):
            render_chat(model, HELLO)
        assert time.monotonic() - started < 5
        assert sys.gettrace() is None  # the bound's trace is gone: nothing else in the thread is slowed
    finally:
        model.close()


def test_the_headless_cli_ends_a_looping_template_with_an_error(models) -> None:
    result = headless(models["loops"], timeout=60)  # today's bound is TEMPLATE_SECONDS (5 s): never a hang
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "chat template was still rendering" in lines[-1] and "Traceback" not in result.stderr


def test_the_server_answers_a_looping_template_with_a_json_error_and_keeps_serving(models, monkeypatch) -> None:
    import httpx

    from tests.conftest import TinyPair
    from tests.test_server import CHAT, running_server

    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.3)
    pair = TinyPair(main=models["loops"], draft=models["none"], twin=models["none"], foreign=models["none"])
    with running_server(pair) as (base, _host, _):
        looped = httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}, timeout=60)
        assert looped.status_code == 500 and "still rendering after 0.3 s" in looped.json()["error"]["message"]
        text = httpx.post(f"{base}/v1/completions", json={"prompt": "the cat", "max_tokens": 4}, timeout=60)
        assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] == 4
