from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tiny_models

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl"
LOCAL_PROMPTS = Path(__file__).resolve().parents[1] / "bench" / "prompts.jsonl"


@dataclass(frozen=True)
class TinyPair:
    main: Path
    draft: Path  # same vocabulary, perturbed weights: partial acceptance
    twin: Path  # identical weights to main: every draft token accepted
    foreign: Path  # a different vocabulary: must be refused as a draft


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    root = tmp_path_factory.mktemp("tiny-models")
    weights = tiny_models.random_weights(seed=1, n_vocab=tiny_models.n_vocab())
    other_words = [w.replace("▁", "▁z") for w in tiny_models.WORDS]
    return TinyPair(
        main=tiny_models.write_model(root / "main.gguf", weights, name="tiny-main"),
        draft=tiny_models.write_model(root / "draft.gguf", tiny_models.perturbed(weights, seed=2, noise=0.35), name="tiny-draft"),
        twin=tiny_models.write_model(root / "twin.gguf", weights, name="tiny-twin"),
        foreign=tiny_models.write_model(
            root / "foreign.gguf",
            tiny_models.random_weights(seed=3, n_vocab=tiny_models.n_vocab(other_words)),
            words=other_words,
            name="tiny-foreign",
        ),
    )


def bench_prompts() -> list[dict[str, str]]:
    """The shared benchmark prompts (beside the checkout), or the copy kept in bench/."""
    path = SHARED_PROMPTS if SHARED_PROMPTS.exists() else LOCAL_PROMPTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _probe_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Kernel probes (probe.py) measured afresh into a scratch cache, for this process and the CLIs it runs."""
    import os

    os.environ["TANDEM_CACHE_DIR"] = str(tmp_path_factory.mktemp("tandem-cache"))
