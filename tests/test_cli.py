"""The headless CLI as a user runs it: a real process, real (tiny) models, every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tandem(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def tiny_args(tiny, *extra: str) -> list[str]:
    return ["--model", str(tiny.main), "--threads", "2", "--ctx-size", "512", *extra]


def test_json_output_is_one_object_with_tokens_and_stats(tiny) -> None:
    # a fixed draft length: adaptive drafting may rightly stay off here (the tiny draft costs what the main model does)
    flags = ("--draft", str(tiny.draft), "--no-adaptive", "--prompt", "the cat", "--temp", "0", "-n", "24", "--json")
    result = tandem(*tiny_args(tiny, *flags))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"text", "tokens", "model_path", "draft_path", "stats"}
    assert len(doc["tokens"]) == 24
    assert doc["draft_path"] == str(tiny.draft)
    stats = doc["stats"]
    for key in (
        "tokens_per_second", "time_to_first_token", "generation_time", "stop_reason", "draft_model",
        "total_draft_tokens_count", "accepted_draft_tokens_count", "rejected_draft_tokens_count",
        "ignored_draft_tokens_count", "prompt_tokens_count", "rounds", "mean_draft_length",
    ):
        assert key in stats
    assert stats["stop_reason"] == "maxPredictedTokensReached"
    assert stats["total_draft_tokens_count"] > 0


def test_no_draft_and_draft_give_the_same_tokens_and_aliases_work(tiny) -> None:
    common = ["--prompt", "hello world", "--temp", "0", "--max-tokens", "40", "--json"]
    plain = json.loads(tandem(*tiny_args(tiny, "--no-draft", *common)).stdout)
    spec = json.loads(tandem("-m", str(tiny.main), "-md", str(tiny.draft), "--draftamount", "5", "-t", "2", "-c", "512", *common).stdout)
    assert plain["draft_path"] is None
    assert spec["tokens"] == plain["tokens"]


def test_prompt_from_stdin_streams_text_and_prints_stats_on_stderr(tiny) -> None:
    result = tandem(*tiny_args(tiny, "--prompt", "-", "--temp", "0", "-n", "8"), stdin="the dog ran")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tok/s" in result.stderr


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model(tmp_path: Path) -> None:
    assert_clean_failure(tandem("--model", str(tmp_path / "nope.gguf"), "--prompt", "hi"), "not found", "nope.gguf")


def test_directory_as_model(tmp_path: Path) -> None:
    assert_clean_failure(tandem("--model", str(tmp_path), "--prompt", "hi"), "is a directory")


def test_non_gguf_model(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("these are not weights\n" * 10)
    assert_clean_failure(tandem("--model", str(fake), "--prompt", "hi"), "not a GGUF model file")


def test_truncated_model(tiny, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny.main.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert_clean_failure(tandem("--model", str(cut), "--prompt", "hi"), "truncated")


def test_header_only_model(tiny, tmp_path: Path) -> None:
    cut = tmp_path / "header.gguf"
    cut.write_bytes(tiny.main.read_bytes()[:4000])
    assert_clean_failure(tandem("--model", str(cut), "--prompt", "hi"), "truncated")


def test_missing_draft(tiny, tmp_path: Path) -> None:
    assert_clean_failure(tandem(*tiny_args(tiny, "--draft", str(tmp_path / "d.gguf"), "--prompt", "hi")), "not found")


def test_incompatible_draft(tiny) -> None:
    assert_clean_failure(tandem(*tiny_args(tiny, "--draft", str(tiny.foreign), "--prompt", "hi")), "cannot be used", "differs")


def test_prompt_longer_than_context(tiny) -> None:
    result = tandem("--model", str(tiny.main), "--ctx-size", "256", "--raw", "--prompt", "the cat sat " * 200)
    assert_clean_failure(result, "context holds 256")


def test_empty_prompt(tiny) -> None:
    assert_clean_failure(tandem(*tiny_args(tiny, "--prompt", "  ")), "prompt is empty")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus-flag"], "unrecognized arguments"),
        (["--temp", "-1"], "--temp"),
        (["--draft-max", "-2"], "--draft-max"),
        (["--draft-p-min", "1.5"], "between 0 and 1"),
        (["--ctx-size", "0"], "1 or more"),
        (["--draft-min", "5", "--draft-max", "2"], "larger than --draft-max"),
        (["--no-draft", "--draft", "x.gguf"], "contradict"),
        (["--temp", "inf"], "finite"),
        (["--temp", "abc"], "expected a number, got 'abc'"),
        (["--draft-max", "1000"], "--draft-max: must be between 0 and 64"),
        (["-c", "10"], "--ctx-size: must be at least 16"),
        (["-t", "999"], "--threads: must be between 1 and 512"),
        (["--repeat-penalty", "0"], "more than 0"),
        (["--seed", "x"], "whole number"),
    ],
)
def test_bad_flags(args: list[str], needle: str) -> None:
    result = tandem(*args, "--prompt", "hi")
    assert result.returncode == 2
    assert_clean_failure(result, needle)


def test_chat_without_a_terminal_says_what_to_do(tiny) -> None:
    assert_clean_failure(tandem(*tiny_args(tiny)), "--prompt")


def test_save_config_then_launch_from_it(tiny, tmp_path: Path) -> None:
    saved = tmp_path / "launch.toml"
    flags = ["--draft", str(tiny.draft), "--temp", "0", "--draft-max", "3", "-n", "12"]
    result = tandem(*tiny_args(tiny, *flags, "--save-config", str(saved)))
    assert result.returncode == 0, result.stderr
    assert f"tandem --config {saved}" in result.stderr
    text = saved.read_text()
    assert "draft_max = 3" in text and "temperature = 0.0" in text and str(tiny.draft) in text
    from_file = tandem("--config", str(saved), "--prompt", "the cat", "--json")
    direct = tandem(*tiny_args(tiny, *flags, "--prompt", "the cat", "--json"))
    assert from_file.returncode == 0, from_file.stderr
    a, b = json.loads(from_file.stdout), json.loads(direct.stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 12 and a["draft_path"] == str(tiny.draft)
    assert max(map(int, a["stats"]["draft_length_histogram"])) <= 3
    # a typed flag beats the file
    override = tandem("--config", str(saved), "--prompt", "the cat", "--json", "-n", "5", "--no-draft")
    doc = json.loads(override.stdout)
    assert len(doc["tokens"]) == 5 and doc["draft_path"] is None and doc["tokens"] == b["tokens"][:5]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[settings]\ntemperature = -2\n", "temperature"),
        ("not toml [", "not valid TOML"),
        ("[settings]\ndraft_max = 4\n", "draft_min (6) is larger than draft_max (4)"),  # with the typed --draft-min 6
    ],
)
def test_a_broken_config_is_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = tandem("--config", str(path), "--prompt", "hi", "--draft-min", "6")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_benchmark_prints_a_table(tiny) -> None:
    result = tandem(*tiny_args(tiny, "--draft", str(tiny.draft), "--benchmark"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tandem benchmark: tiny-main + draft.gguf")
    assert any(line.startswith("main-model kernels: batch-invariant") for line in lines)  # the self-check, stated
    assert any(line.startswith("llama.cpp: CPU backend ") for line in lines)  # which build runs here
    assert any(line.startswith("weights of main.gguf: ") for line in lines)  # and where the weights live
    header = next(i for i, line in enumerate(lines) if line.startswith("mode"))
    assert lines[header].split()[-1] == "exact"
    rows = {line.split()[0]: line for line in lines[header + 1 : header + 4]}
    assert set(rows) == {"plain", "fixed", "adaptive"} and "1.00x" in rows["plain"]
    assert all(row.split()[-1] == "yes" for row in rows.values())
    assert "differed from plain" not in result.stdout  # every mode produced plain's tokens


def test_help_groups_flags_like_koboldcpp() -> None:
    result = tandem("--help")
    for group in ("launcher:", "model:", "draft (speculative decoding):", "hardware:", "sampling:", "headless:"):
        assert group in result.stdout
    for flag in ("--config", "--save-config", "--models-dir", "--benchmark", "--draftmodel", "--gpulayers"):
        assert flag in result.stdout


def test_chat_app_needs_a_terminal(tiny) -> None:
    result = tandem(*tiny_args(tiny), stdin="")
    assert result.returncode == 1 and "not a terminal" in result.stderr


def run_bytes(*args: bytes | str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, input=stdin, capture_output=True, timeout=300)


def assert_quiet(stderr: bytes) -> None:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text and "Exception ignored" not in text, text


def test_a_prompt_that_is_not_utf8_is_one_clear_error(tiny) -> None:
    argv = run_bytes(*tiny_args(tiny), "--prompt", b"caf\xe9 \xff")
    assert argv.returncode == 2 and b"not valid UTF-8" in argv.stderr
    assert_quiet(argv.stderr)
    stdin = run_bytes(*tiny_args(tiny), "--prompt", "-", stdin=b"caf\xe9 \xff")
    assert stdin.returncode == 1 and b"not valid UTF-8" in stdin.stderr
    assert_quiet(stdin.stderr)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_reader_that_goes_away_or_a_closed_stdout_ends_quietly(tiny, tmp_path: Path, json_flag: list[str]) -> None:
    args = " ".join([*tiny_args(tiny, "-n", "400", "--temp", "0"), *json_flag])
    err = tmp_path / "err"
    for redirect in ("| head -c 5 > /dev/null", ">&-"):
        result = subprocess.run(f"{sys.executable} -m app {args} --prompt 'the cat' 2>{err} {redirect}", shell=True,
                                cwd=ROOT, timeout=300)  # fmt: skip
        assert_quiet(err.read_bytes())
        assert result.returncode == 0


def test_a_missing_config_file_is_an_error(tiny, tmp_path: Path) -> None:
    assert_clean_failure(tandem(*tiny_args(tiny, "--config", str(tmp_path / "nope.toml"), "--prompt", "hi")), "config file not found")


def test_a_missing_draft_is_said_before_the_demo_download(tmp_path: Path) -> None:
    env = {"TANDEM_MODELS_CACHE": str(tmp_path / "cache"), "TANDEM_INDEX_URL": "http://127.0.0.1:9/simple"}
    result = tandem("--draft", str(tmp_path / "d.gguf"), "--prompt", "hi", env=env)
    assert_clean_failure(result, "not found", "d.gguf")
    assert not (tmp_path / "cache").exists()  # nothing fetched, nothing created


def test_an_unwritable_demo_cache_or_a_missing_wheel_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    result = tandem("--prompt", "hi", env={"TANDEM_MODELS_CACHE": str(blocker / "models")})
    assert_clean_failure(result, "cannot write the demo models", str(blocker / "models"))
    env = {"TANDEM_MODELS_CACHE": str(tmp_path / "cache"), "TANDEM_DEMO_WHEEL": str(tmp_path / "missing.whl")}
    assert_clean_failure(tandem("--prompt", "hi", env=env), "TANDEM_DEMO_WHEEL", "missing.whl")


def test_files_that_are_not_models_are_named_for_what_they_are(tiny, tmp_path: Path) -> None:
    import gguf

    vocab_only = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(vocab_only), "llama")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert_clean_failure(tandem("--model", str(vocab_only), "--prompt", "hi"), "no weights")
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    assert_clean_failure(tandem("--model", str(loop), "--prompt", "hi"), "loops back")
    other = tmp_path / "other.gguf"
    data = bytearray(tiny.main.read_bytes())
    at = data.find(b"llama", data.find(b"general.architecture"))
    data[at : at + 5] = b"lxama"
    other.write_bytes(bytes(data))
    assert_clean_failure(tandem("--model", str(other), "--prompt", "hi"), "unknown model architecture: 'lxama'")


def test_a_cache_folder_that_cannot_be_written_costs_only_the_cache(tiny, tmp_path: Path) -> None:
    """A cache under a file (as a read-only mount refuses it, root included): the probe cannot store its figures,
    nor clean up after trying; the reply comes all the same, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    flags = ("--draft", str(tiny.draft), "--prompt", "the cat", "--temp", "0", "-n", "8", "--json")
    result = tandem(*tiny_args(tiny, *flags), env={"TANDEM_CACHE_DIR": str(blocker / "cache")})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and len(json.loads(result.stdout)["tokens"]) == 8
