"""The demo pair (SmolLM2-135M-Instruct F16 main, Q4_1 draft): real language, real acceptance.

Marked `real_model`: the first run downloads ~93 MB into the cache. CI runs these too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.engine.backend import Model
from app.engine.chat import ChatSession
from app.engine.demo import ensure_demo_pair
from app.engine.events import Finished
from app.engine.sampling import SamplerSettings
from app.engine.speculative import GenerationConfig, SpeculativeEngine
from tests.conftest import bench_prompts

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]
QUICKSORT = "Write a quicksort algorithm in Python. Write code only."


@pytest.fixture(scope="module")
def demo() -> tuple[Model, Model]:
    main, draft = ensure_demo_pair()
    return Model(main), Model(draft)


def reply(engine: SpeculativeEngine, prompt: str, **config) -> Finished:
    session = ChatSession(engine)
    cfg = GenerationConfig(sampler=SamplerSettings(temperature=0.0), **config)
    return next(e for e in session.send(prompt, cfg) if isinstance(e, Finished))


@pytest.mark.parametrize("prompt", bench_prompts(), ids=lambda p: p["id"])
def test_every_bench_prompt_is_token_identical_to_plain(demo, prompt) -> None:
    main, draft = demo
    plain = reply(SpeculativeEngine(main, None, n_ctx=2048, n_threads=2), prompt["prompt"], max_tokens=256)
    spec_engine = SpeculativeEngine(main, draft, n_ctx=2048, n_threads=2, lookup=True)
    for k in (1, 4, 8):
        spec = reply(spec_engine, prompt["prompt"], max_tokens=256, draft_max=k, adaptive=False)
        assert spec.tokens == plain.tokens, f"draft-max {k}"
        assert spec.stats.accepted_draft_tokens_count > 0
    adaptive = reply(spec_engine, prompt["prompt"], max_tokens=256, draft_max=8, adaptive=True)
    assert adaptive.tokens == plain.tokens, "adaptive"
    lookup_only = reply(SpeculativeEngine(main, None, n_ctx=2048, n_threads=2, lookup=True), prompt["prompt"], max_tokens=256)
    assert lookup_only.tokens == plain.tokens, "lookup"


def test_demo_pair_is_compatible_and_mostly_agrees(demo) -> None:
    main, draft = demo
    out = reply(SpeculativeEngine(main, draft, n_ctx=2048, n_threads=2), QUICKSORT, max_tokens=128, draft_max=4, adaptive=False)
    assert out.stats.acceptance_rate > 0.6
    assert "def" in out.text


def test_cli_default_run_equals_no_draft_run() -> None:
    """The acceptance command as a user types it: no flags but the prompt, --temp 0 and --json."""

    def run(*extra: str) -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "app", "--prompt", QUICKSORT, "--temp", "0", "--json", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(),
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    spec, plain = run(), run("--no-draft")
    assert spec["draft_path"] and plain["draft_path"] is None
    assert spec["tokens"] == plain["tokens"] and spec["stats"]["exact"]  # the demo main model is F16: exact kernels
    # drafting happened, or the engine says why it could not pay on this machine
    assert spec["stats"]["accepted_draft_tokens_count"] > 0 or " off: " in spec["stats"]["speculation"]
    assert "def " in spec["text"]
