"""The main model's own multi-token-prediction head drafts (issue #27, part 3): `mtp` is a draft source beside the
draft model and prompt lookup, run in llama.cpp's MTP context (LLAMA_CONTEXT_TYPE_MTP) from the main model's hidden
states, as llama.cpp's draft-mtp does, and the output is plain decoding's.

No real model with an MTP head can be fetched here: a tiny random-weight Qwen3.5 (hybrid: gated delta net and
attention layers) with one NextN block (tests/tiny_models.qwen35_weights) stands in. It proves correctness; speed
on real Qwen3.5/3.6, GLM or DeepSeek heads is unmeasured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.engine.backend import Context, Model, MtpContext
from app.engine.sampling import SamplerSettings
from app.engine.speculative import MTP_DEPTH, GenerationConfig, SpeculativeEngine
from tests import tiny_models
from tests.test_recurrent import GREEDY, run, run_together

PROMPT = "def sort ( x ) : return x"


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory) -> dict[str, Model]:
    """A tiny Qwen3.5 whose MTP head agrees with it most of the time (not always), and one without a head."""
    root: Path = tmp_path_factory.mktemp("qwen35")
    weights = tiny_models.qwen35_weights(damp=0.1, mtp_noise=0.015)
    trunk = {k: v for k, v in weights.items() if not k.startswith("blk.2.")}
    return {
        "mtp": Model(tiny_models.qwen35_model(root / "qwen35-mtp.gguf", weights), n_gpu_layers=0, mtp=True),
        "plain": Model(tiny_models.qwen35_model(root / "qwen35.gguf", trunk, name="tiny-qwen35-trunk"), n_gpu_layers=0),
    }


def engine_of(main: Model, mtp: bool = True, lookup: bool = False, n_seq: int = 1) -> SpeculativeEngine:
    return SpeculativeEngine(main, None, n_ctx=512, n_threads=2, lookup=lookup, n_seq=n_seq, mtp=mtp)


def test_the_tiny_file_is_a_hybrid_with_one_mtp_block(qwen35) -> None:
    import llama_cpp

    main = qwen35["mtp"]
    assert llama_cpp.llama_model_is_hybrid(main.ptr) and main.recurrent
    assert main.mtp_layers == 1 and main.info.mtp_layers == 1 and llama_cpp.llama_model_n_layer_nextn(main.ptr) == 1
    assert qwen35["plain"].mtp_layers == 0


def test_the_head_predicts_from_the_main_models_hidden_states(qwen35) -> None:
    """Fed every token with the main model's hidden state before it (one batch), the head's logits equal those it
    gives token by token, and its guesses are mostly, not always, the main model's next token."""
    main = qwen35["mtp"]
    ctx = Context(main, 256, 2, hidden=True)
    head = MtpContext(ctx, 2)
    tokens = main.tokenize(PROMPT)
    n_prompt = len(tokens)
    ctx.decode(tokens)
    hidden = [ctx.hidden().copy()]
    while len(tokens) < n_prompt + 40:
        tokens.append(int(ctx.logits()[-1].argmax()))
        ctx.decode(tokens[-1:])
        hidden.append(ctx.hidden().copy())
    rows = np.concatenate([np.zeros((1, ctx.n_embd), np.float32), *hidden])[: len(tokens)]
    assert np.abs(rows[1:]).max() > 0  # the prompt's read (logits on its last token only) kept every token's state
    step = head.n_batch
    batched = np.concatenate([head.feed([(0, tokens[i : i + step], rows[i : i + step], step)])[0].copy()
                              for i in range(0, len(tokens), step)])  # fmt: skip
    head.clear()
    one_by_one = np.stack([head.feed([(0, [t], rows[i : i + 1], 1)])[0][-1].copy() for i, t in enumerate(tokens)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-3, atol=1e-3)
    guessed = batched.argmax(axis=1)[:-1] == np.array(tokens[1:])
    assert 0.5 < guessed[n_prompt:].mean() < 1.0  # of the main model's own tokens
    head.close()
    ctx.close()


@pytest.mark.parametrize("lookup", [False, True])
def test_greedy_mtp_speculation_equals_plain(qwen35, lookup: bool) -> None:
    main = qwen35["mtp"]
    prompt = main.tokenize(PROMPT)
    plain, _ = run(engine_of(main, mtp=False), prompt, max_tokens=64)
    spec, rounds = run(engine_of(main, lookup=lookup), prompt, max_tokens=64, draft_max=4)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted_draft_tokens_count > 0, "no MTP draft was accepted"
    assert spec.stats.rejected_draft_tokens_count > 0, "no MTP draft was rejected: the rollback was not exercised"
    assert {r.draft_source for r in rounds} >= {"mtp"}


def test_the_adaptive_controller_drafts_with_the_head_and_stays_exact(qwen35) -> None:
    main = qwen35["mtp"]
    prompt = main.tokenize(PROMPT)
    plain, _ = run(engine_of(main, mtp=False), prompt, max_tokens=96)
    engine = engine_of(main, lookup=True)
    assert engine.draft_name == "MTP head + prompt lookup"
    out, rounds = run(engine, prompt, max_tokens=96, adaptive=True, draft_p_min=0.75)
    assert out.tokens == plain.tokens
    assert any(r.draft_source == "mtp" for r in rounds)  # probed at least (its prior: a tenth of a main token)


def test_seeded_sampling_with_mtp_equals_seeded_plain(qwen35) -> None:
    main = qwen35["mtp"]
    prompt = main.tokenize(PROMPT)
    sampler = SamplerSettings(temperature=0.7, seed=4321)
    plain, _ = run(engine_of(main, mtp=False), prompt, max_tokens=48, sampler=sampler)
    spec, _ = run(engine_of(main), prompt, max_tokens=48, sampler=sampler, draft_max=3)
    assert spec.tokens == plain.tokens
    assert spec.stats.total_draft_tokens_count > 0


def test_mtp_drafts_go_no_deeper_than_its_depth_or_the_snapshots(qwen35) -> None:
    main = qwen35["mtp"]
    engine = engine_of(main)
    prompt = main.tokenize(PROMPT)
    out, rounds = run(engine, prompt, max_tokens=64, draft_max=16)
    assert 0 < max(len(r.drafted) for r in rounds) <= min(MTP_DEPTH, engine.main_ctx.rollback_limit)
    assert out.tokens == run(engine_of(main, mtp=False), prompt, max_tokens=64)[0].tokens


def test_the_head_holds_only_what_the_main_model_kept(qwen35) -> None:
    """After each reply (rejected drafts included) the head's cache is the main model's, plus the verify's first
    token; a regenerated turn reads from a checkpoint and equals a fresh read."""
    main = qwen35["mtp"]
    engine = engine_of(main)
    prompt = main.tokenize(PROMPT)
    first, _ = run(engine, prompt, max_tokens=40, draft_max=4)
    held, kept = engine.mtp.ctx.seqs[0], engine.main_ctx.seqs[0]
    assert held == kept[: len(held)] and len(kept) - len(held) <= 4
    # the hidden state at the prompt's end is kept: a regenerated reply feeds the head from there again, not zeros
    anchor = len(prompt) - 2
    assert any(start <= anchor < start + len(rows) for start, rows in engine.mtp._pending[0])
    again, _ = run(engine, prompt, max_tokens=40, draft_max=4)
    assert again.stats.prompt_tokens_evaluated == 1 and again.tokens == first.tokens
    follow = [*prompt, *first.tokens, *main.tokenize(" hello world", add_special=False)]
    cont, _ = run(engine, follow, max_tokens=24, draft_max=4)
    assert cont.tokens == run(engine_of(main, mtp=False), follow, max_tokens=24)[0].tokens


def test_four_sequences_draft_with_the_head_and_each_equals_plain(qwen35) -> None:
    main = qwen35["mtp"]
    prompts = [main.tokenize(p) for p in (PROMPT, "the cat sat on the mat and the dog ran to the mat and the cat sat on the mat and",
                                          "hello world , hello world ,", "def sort ( x ) : return x + 1")]  # fmt: skip
    engine = engine_of(main, n_seq=4)
    cfg = GenerationConfig(max_tokens=32, sampler=GREEDY, adaptive=False, draft_max=3, draft_p_min=0.0)
    accepted = 0
    for i, (prompt, finished) in enumerate(zip(prompts, run_together(engine, prompts, cfg, apart=True), strict=True)):
        assert finished.tokens == run(engine_of(main, mtp=False), prompt, max_tokens=32)[0].tokens, i
        accepted += finished.stats.accepted_draft_tokens_count
    assert accepted > 0


def test_a_model_without_a_head_refuses_mtp_in_one_sentence(qwen35) -> None:
    from app.engine.errors import TandemError

    with pytest.raises(TandemError, match="no MTP head"):
        engine_of(qwen35["plain"])


# ---- the head as a draft choice: CLI, server, pickers, debug pane ------------------------------------------------


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    return tiny_models.qwen35_model(tmp_path_factory.mktemp("head") / "qwen35-mtp.gguf",
                                    tiny_models.qwen35_weights(damp=0.1, mtp_noise=0.015))  # fmt: skip


def test_the_cli_drafts_with_the_head_by_default_and_counts_its_rounds(head_file: Path, tiny) -> None:
    import json

    from tests.test_cli import tandem

    common = ("--model", str(head_file), "--raw", "--prompt", PROMPT, "--temp", "0", "-n", "48", "--json", "--threads", "2")
    result = tandem(*common, "--no-adaptive", "--draft-p-min", "0", "--draft-max", "3")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["draft_model"] == "MTP head + prompt lookup" and stats["speculation"] in ("", "fixed draft length 3")
    mtp = stats["sources"]["mtp"]
    assert mtp["rounds"] > 0 and 0 < mtp["accepted"] < mtp["drafted"]
    plain = tandem(*common, "--no-draft")
    assert json.loads(plain.stdout)["tokens"] == json.loads(result.stdout)["tokens"]
    refused = tandem("--model", str(tiny.main), "--draft", "mtp", "--prompt", "hi", "-n", "4", "--threads", "2")
    assert refused.returncode != 0 and "no MTP head" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_request_asks_for_the_head_and_metrics_count_it_by_source(head_file: Path) -> None:
    from types import SimpleNamespace

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_server import running_server

    served = SimpleNamespace(main=head_file, draft="lookup")
    with running_server(served, draft_max=3, adaptive=False, draft_p_min=0.0) as (base, _host, _):
        body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 24, "speculative": {"mode": "mtp"}}
        reply = httpx.post(f"{base}/api/v0/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        stats = reply.json()["stats"]
        assert stats["draft_model"].startswith("MTP head") and stats["sources"]["mtp"]["rounds"] > 0
        text = httpx.get(f"{base}/metrics", timeout=30).text
        samples = {(s.name, s.labels.get("source")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("tandem:drafts_by_source_total", "mtp")] == stats["sources"]["mtp"]["rounds"]
        assert samples[("tandem:draft_tokens_accepted_by_source_total", "mtp")] == stats["sources"]["mtp"]["accepted"]


def test_the_draft_picker_lists_the_built_in_head_first(head_file: Path, tiny) -> None:
    from app.engine.catalog import find_models
    from app.engine.gguf_info import read_gguf_info
    from app.tui.choices import draft_choices

    with_head = draft_choices(head_file, read_gguf_info(head_file), find_models([head_file.parent]))
    assert with_head[0].value == "mtp" and "MTP" in with_head[0].label
    without = draft_choices(tiny.main, read_gguf_info(tiny.main), [])
    assert "mtp" not in [c.value for c in without]


def test_the_debug_pane_names_mtp_rounds(qwen35) -> None:
    from app.tui.widgets.debug import format_round, round_details

    main = qwen35["mtp"]
    _, rounds = run(engine_of(main), main.tokenize(PROMPT), max_tokens=24, draft_max=3)
    event = next(r for r in rounds if r.draft_source == "mtp")
    assert " mtp " in format_round(1, event).plain
    assert any("MTP head" in line.plain for line in round_details(1, event))


def test_a_drafter_that_runs_only_inside_the_main_context_is_refused_in_words(tmp_path: Path, tiny) -> None:
    """Gemma 4's MTP drafter files (gemma4-assistant), EAGLE-3 and DFlash: refused from the header, with the reason."""
    import gguf

    from app.engine.compat import metadata_compatibility
    from app.engine.gguf_info import read_gguf_info

    path = tmp_path / "assistant.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma4-assistant")
    tiny_models._add_vocabulary(writer, tiny_models.WORDS, 2)
    tiny_models._write(writer, {"token_embd.weight": np.zeros((tiny_models.n_vocab(), 8), dtype=np.float32)})
    verdict = metadata_compatibility(read_gguf_info(tiny.main), read_gguf_info(path))
    assert not verdict.ok and "Gemma 4's MTP drafter" in verdict.reason and "--draft mtp" in verdict.reason


def test_a_long_prompt_feeds_the_head_as_it_is_read_and_keeps_few_hidden_states(qwen35) -> None:
    from app.engine.speculative import MTP_FEED_AFTER

    main = qwen35["mtp"]
    engine = engine_of(main)
    prompt = main.tokenize("the cat sat on the mat and the dog ran to the mat and " * 12)[:400]
    run(engine, prompt, max_tokens=1)  # one plain round: the head has not drafted yet
    assert len(engine.mtp.ctx.seqs[0]) >= MTP_FEED_AFTER  # fed in batches while the prompt was read
    assert sum(len(rows) for _, rows in engine.mtp._pending[0]) < len(prompt) - MTP_FEED_AFTER + 64
    out, rounds = run(engine, prompt, max_tokens=24, draft_max=3)
    assert out.tokens == run(engine_of(main, mtp=False), prompt, max_tokens=24)[0].tokens
    assert any(r.draft_source == "mtp" and r.n_accepted for r in rounds)
