"""Can this draft model propose tokens for that main model? One rule, llama.cpp's
`common_speculative_are_compatible`, for a loaded model (the engine) and for a GGUF header (the
pickers, before anything is loaded): same vocabulary type, same BOS/EOS where they are added,
vocabulary sizes within 128, and identical text for every token id from 5 on (low ids are often
remapped specials). Every id, not a sample: a draft whose token 1000 differs proposes wrong tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.engine.backend import Model
    from app.engine.gguf_info import GGUFInfo

MAX_VOCAB_SIZE_DIFFERENCE = 128
FIRST_CHECKED_TOKEN = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID


@dataclass(frozen=True)
class Compatibility:
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Vocabulary:
    """What the rule compares, from either source."""

    kind: str  # the tokenizer type
    n_tokens: int
    bos: int
    eos: int
    add_bos: bool | None  # None: not in the GGUF header, the tokenizer type's default (BOS/EOS ids then compared)
    add_eos: bool | None
    texts: Callable[[int, int], list[bytes]]  # raw text of ids start..stop-1


def compare_vocabularies(main: Vocabulary, draft: Vocabulary) -> Compatibility:
    if main.kind != draft.kind:
        return Compatibility(False, f"vocabulary types differ (main {main.kind}, draft {draft.kind})")
    if main.add_bos != draft.add_bos or (main.add_bos is not False and main.bos != draft.bos):
        return Compatibility(False, f"BOS tokens differ (main {main.bos} add={main.add_bos}, draft {draft.bos} add={draft.add_bos})")
    if main.add_eos != draft.add_eos or (main.add_eos is not False and main.eos != draft.eos):
        return Compatibility(False, f"EOS tokens differ (main {main.eos} add={main.add_eos}, draft {draft.eos} add={draft.add_eos})")
    diff = abs(main.n_tokens - draft.n_tokens)
    if diff > MAX_VOCAB_SIZE_DIFFERENCE:
        return Compatibility(
            False,
            f"vocabulary sizes differ by {diff} (main {main.n_tokens}, draft {draft.n_tokens}; at most {MAX_VOCAB_SIZE_DIFFERENCE})",
        )
    stop = min(main.n_tokens, draft.n_tokens)
    main_texts, draft_texts = main.texts(FIRST_CHECKED_TOKEN, stop), draft.texts(FIRST_CHECKED_TOKEN, stop)
    if main_texts != draft_texts:  # one C-level comparison; the loop only names the first difference
        for offset, (a, b) in enumerate(zip(main_texts, draft_texts, strict=False)):
            if a != b:
                token = FIRST_CHECKED_TOKEN + offset
                return Compatibility(
                    False, f"token {token} differs (main {a.decode(errors='replace')!r}, draft {b.decode(errors='replace')!r})"
                )
        return Compatibility(False, "the vocabularies could not be read in full")
    return Compatibility(True)


# llama.cpp's vocabulary types (llama_vocab_type) and the GGUF tokenizer names that select them
_TYPE_NAMES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}
_GGUF_TYPES = {"no_vocab": "none", "llama": "spm", "gpt2": "bpe", "bert": "wpm", "t5": "ugm", "rwkv": "rwkv", "plamo2": "plamo2"}


def model_vocabulary(model: Model) -> Vocabulary:
    import llama_cpp

    vocab = model.vocab

    def texts(start: int, stop: int) -> list[bytes]:
        return [llama_cpp.llama_vocab_get_text(vocab, i) or b"" for i in range(start, stop)]

    kind = int(llama_cpp.llama_vocab_type(vocab))
    return Vocabulary(
        _TYPE_NAMES.get(kind, str(kind)),
        model.n_vocab,
        model.bos,
        model.eos,
        model.add_bos,
        bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        texts,
    )


def gguf_vocabulary(info: GGUFInfo) -> Vocabulary:
    meta = info.metadata
    kind = str(meta.get("tokenizer.ggml.model"))

    def flag(key: str) -> bool | None:
        value = meta.get(key)
        return None if value is None else bool(value)

    def token(key: str) -> int:
        value = meta.get(key)
        return -1 if value is None else int(value)

    return Vocabulary(
        _GGUF_TYPES.get(kind, kind),
        info.vocab_size,
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
        flag("tokenizer.ggml.add_bos_token"),
        flag("tokenizer.ggml.add_eos_token"),
        lambda start, stop: _token_bytes(str(info.path), info.file_size, info.path.stat().st_mtime_ns, start, stop),
    )


@functools.lru_cache(maxsize=4)  # a picker compares one main model's vocabulary with every candidate draft
def _token_bytes(path: str, _size: int, _mtime_ns: int, start: int, stop: int) -> list[bytes]:
    from app.engine.gguf_info import read_gguf_info

    return read_gguf_info(path).token_bytes(start, stop)


def check_compatibility(main: Model, draft: Model) -> Compatibility:
    return compare_vocabularies(model_vocabulary(main), model_vocabulary(draft))


def require_compatible(main_name: str, draft_name: str, compat: Compatibility) -> None:
    """The one sentence for an incompatible pair, whether judged from headers (before loading) or loaded models."""
    from app.engine.errors import IncompatibleDraftError

    if not compat.ok:
        raise IncompatibleDraftError(f"draft {draft_name} cannot be used with {main_name}: {compat.reason}")


# drafter files that are not models of their own: llama.cpp runs them against the main model's context and hidden
# states (common/speculative.cpp: gemma4-assistant shares the main model's KV cache; EAGLE-3 and DFlash read its layers)
HEAD_ONLY_DRAFTERS = {"gemma4-assistant": "Gemma 4's MTP drafter", "eagle3": "an EAGLE-3 drafter", "dflash": "a DFlash drafter"}


def metadata_compatibility(main: GGUFInfo, draft: GGUFInfo) -> Compatibility:
    """The same rule from GGUF headers alone (no weights loaded): what the pickers show. A drafter that only runs
    inside the main model's context is refused in words here, before llama.cpp fails to make it a context."""
    if draft.architecture in HEAD_ONLY_DRAFTERS:
        return Compatibility(False, f"it is {HEAD_ONLY_DRAFTERS[draft.architecture]} ({draft.architecture}), which Tandem does "
                                    "not run yet; a main model with its own MTP layers drafts with --draft mtp")  # fmt: skip
    return compare_vocabularies(gguf_vocabulary(main), gguf_vocabulary(draft))
