"""Prompt-lookup (n-gram) drafting: when the text so far ends with an n-gram seen earlier, propose
what followed it last time. Costs microseconds, so it pays whenever output copies its input
(edits, renames, quoting). Reference: llama.cpp's lookup decoding, llama-cpp-python's
LlamaPromptLookupDecoding."""

from __future__ import annotations

from app.engine.controller import LOOKUP_TRAITS


class LookupDrafter:
    source = "lookup"
    traits = LOOKUP_TRAITS

    # 2-gram matches mislead right where copying breaks off: after a renamed identifier the new name's two
    # tokens last appeared at its definition, whose continuation is wrong (rename prompt, Qwen2.5-Coder-1.5B,
    # AMD EPYC: lookup alone 1.00x plain with 2..3-grams, 1.10-1.21x with 3..6-grams). Longer contexts
    # pick the right earlier occurrence where a shorter one is ambiguous.
    def __init__(self, max_ngram: int = 6, min_ngram: int = 3):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._follow: dict[tuple[int, ...], int] = {}  # n-gram -> index just after its latest earlier occurrence
        self._indexed: list[int] = []  # the tokens whose n-grams are in the table (but the last, the query)

    def start(self, tokens: list[int]) -> None:
        """A new reply. The table is kept only if this sequence continues the one indexed (the next turn
        of the same chat); otherwise (a new chat, a reopened one, an edited turn) it is rebuilt, or it
        would propose continuations from another conversation that merely shares a system prompt."""
        n = len(self._indexed)
        if len(tokens) < n or tokens[:n] != self._indexed:
            self._follow.clear()
            self._indexed = []
        self._refresh(tokens)  # the prompt indexed now, not in the reply's first round (a one-off there, timed as deciding)

    def _refresh(self, tokens: list[int]) -> None:
        end = len(tokens) - 1  # never index the n-grams ending at the last token: they are the query
        for i in range(len(self._indexed), end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i + 1 >= n:
                    self._follow[tuple(tokens[i + 1 - n : i + 1])] = i + 1
        if end > len(self._indexed):
            self._indexed.extend(tokens[len(self._indexed) : end])

    def match(self, tokens: list[int], k: int) -> list[int]:
        """The longest-context continuation available, at most k tokens."""
        self._refresh(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) >= n:
                start = self._follow.get(tuple(tokens[-n:]))
                if start is not None:
                    return tokens[start : start + k]
        return []
