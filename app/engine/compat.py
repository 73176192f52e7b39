"""Can this draft model propose tokens for that main model? Mirrors llama.cpp's
`common_speculative_are_compatible`: same vocabulary type, same BOS/EOS handling, vocab sizes
within 128, identical token text from id 5 on (a sample of ids, so the check stays instant)."""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp

from app.engine.backend import Model

MAX_VOCAB_SIZE_DIFFERENCE = 128
FIRST_CHECKED_TOKEN = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID: low ids are often remapped specials
TEXT_SAMPLE_SIZE = 2048


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str = ""


def _sample_ids(n_vocab: int) -> range | list[int]:
    """Every id for small vocabularies, an even spread plus the last ids for big ones."""
    span = n_vocab - FIRST_CHECKED_TOKEN
    if span <= TEXT_SAMPLE_SIZE:
        return range(FIRST_CHECKED_TOKEN, n_vocab)
    step = span // TEXT_SAMPLE_SIZE
    return [*range(FIRST_CHECKED_TOKEN, n_vocab, step), *range(n_vocab - 64, n_vocab)]


def check_compatibility(main: Model, draft: Model) -> Compatibility:
    main_type, draft_type = llama_cpp.llama_vocab_type(main.vocab), llama_cpp.llama_vocab_type(draft.vocab)
    if main_type != draft_type:
        return Compatibility(False, f"vocabulary types differ (main {main_type}, draft {draft_type})")
    if main.add_bos != draft.add_bos or (main.add_bos and main.bos != draft.bos):
        return Compatibility(False, f"BOS tokens differ (main {main.bos} add={main.add_bos}, draft {draft.bos} add={draft.add_bos})")
    main_add_eos = llama_cpp.llama_vocab_get_add_eos(main.vocab)
    draft_add_eos = llama_cpp.llama_vocab_get_add_eos(draft.vocab)
    if main_add_eos != draft_add_eos or (main_add_eos and main.eos != draft.eos):
        return Compatibility(False, f"EOS tokens differ (main {main.eos}, draft {draft.eos})")
    diff = abs(main.n_vocab - draft.n_vocab)
    if diff > MAX_VOCAB_SIZE_DIFFERENCE:
        return Compatibility(
            False,
            f"vocabulary sizes differ by {diff} (main {main.n_vocab}, draft {draft.n_vocab}; at most {MAX_VOCAB_SIZE_DIFFERENCE})",
        )
    for token in _sample_ids(min(main.n_vocab, draft.n_vocab)):
        main_text, draft_text = main.token_text(token), draft.token_text(token)
        if main_text != draft_text:
            return Compatibility(False, f"token {token} differs (main {main_text!r}, draft {draft_text!r})")
    return Compatibility(True)
