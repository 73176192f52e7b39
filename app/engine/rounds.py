"""Several replies at once (llama.cpp's server slots). Each round, the sequences that draft with the draft
model draft together (ModelDrafter.propose_all: one decode per draft position), then every active sequence's
main-model need (a verify batch, or a chunk of its prompt) goes out in as few decodes as the batch allows.
On a CPU 4 tokens cost 1.3-2.7x one token and on a GPU about one, so four sequences verified in one decode
cost far less than four decodes.

Invariants:
- A decode's logits are a view over llama.cpp's buffer, valid until the next decode: every sequence in a
  decode is resumed (reads its rows, drafts, reaches its next need) before the next decode starts.
- A sequence whose reader is behind (`ready` says no) contributes nothing to a round and is not resumed; the
  others go on. A cancelled one is resumed at its next round and ends with its Finished.
- An error ends only the sequences it touched: an exception inside one reply ends that reply; a failed
  decode ends the sequences that were in it.
- --exact (engine.exact_cap set): no decode carrying verify rows is wider than the self-check's exact width,
  and a prompt chunk is read alone, as plain decoding reads it, so a reply stays bit-identical to plain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

from app.engine.events import Event
from app.engine.speculative import DraftRequest, GenerationConfig, SpeculativeEngine, Verify

# What a round hands back, in order: (key, event), (key, None) when that reply is over, (key, exception) when
# it failed (nothing more comes for that key).
Outcome = tuple[Hashable, Event | BaseException | None]


@dataclass
class _Active:
    key: Hashable
    steps: Iterator[Event | Verify | DraftRequest]
    need: Verify | DraftRequest | None = None


class Rounds:
    def __init__(self, engine: SpeculativeEngine):
        self.engine = engine
        self._active: dict[int, _Active] = {}  # sequence -> its reply

    @property
    def busy(self) -> int:
        return len(self._active)

    @property
    def full(self) -> bool:
        return len(self._active) >= self.engine.n_seq

    def start(self, key: Hashable, prompt: Sequence[int], config: GenerationConfig,
              cancel: threading.Event | None = None) -> list[Outcome]:  # fmt: skip
        """Begin a reply on the free sequence that holds most of `prompt`; returns what it said before its
        first need (nothing, or its failure)."""
        seq = self.engine.pick_sequence(prompt, set(self._active))
        active = _Active(key, self.engine.sequence(seq, prompt, config, cancel))
        self._active[seq] = active
        out: list[Outcome] = []
        self._advance(seq, active, out)
        return out

    def round(self, ready: Callable[[Hashable], bool] = lambda _key: True) -> list[Outcome]:
        """One round: the ready sequences that draft with the draft model draft together; then every ready
        sequence's verify (or prompt chunk) is decoded, and each is resumed to its next need."""
        out: list[Outcome] = []
        chosen = [(seq, a) for seq, a in self._active.items() if a.need is not None and ready(a.key)]
        drafting = [(seq, a) for seq, a in chosen if isinstance(a.need, DraftRequest)]
        if drafting:
            try:
                self.engine.propose([a.need for _, a in drafting])
            except Exception as exc:  # the draft decode failed: the replies drafting end, the others go on
                for seq, active in drafting:
                    self._end(seq, active, out, exc)
            else:
                for seq, active in drafting:
                    self._advance(seq, active, out)
        waiting = [(seq, a) for seq, a in chosen if seq in self._active and isinstance(a.need, Verify)]
        verifying = sum(a.need.logits for _, a in waiting)
        for _, active in waiting:
            active.need.round_sequences = verifying
        for group in self._groups(waiting):
            needs = [a.need for _, a in group]
            try:
                self.engine.decode(needs)
            except Exception as exc:  # the decode failed: every reply in it ends, the others go on
                for seq, active in group:
                    self._end(seq, active, out, exc)
                continue
            for seq, active in group:
                self._advance(seq, active, out)
        return out

    def close(self) -> None:
        """End every reply now, without their Finished (the engine is going away)."""
        for active in self._active.values():
            active.steps.close()
        self._active.clear()

    def _groups(self, waiting: list[tuple[int, _Active]]) -> list[list[tuple[int, _Active]]]:
        """Needs packed, in order, into decodes no wider than the batch (first fit); under --exact a verify
        decode is no wider than the exact width and a prompt chunk goes alone."""
        engine = self.engine
        widest = engine.main_ctx.n_batch
        exact = engine.exact_cap is not None
        verify_widest = min(widest, engine.main_profile.kernels.exact_up_to) if exact else widest
        groups: list[list[tuple[int, _Active]]] = []
        widths: list[int] = []
        for item in waiting:
            need = item[1].need
            size = len(need.tokens)
            if exact and not need.logits:
                groups.append([item])
                widths.append(widest + 1)  # closed: nothing joins a prompt chunk read alone
                continue
            cap = verify_widest if need.logits else widest  # (the same but under --exact, where prompts go alone)
            for i, group in enumerate(groups):
                if widths[i] + size <= cap:
                    group.append(item)
                    widths[i] += size
                    break
            else:
                groups.append([item])
                widths.append(size)
        return groups

    def _advance(self, seq: int, active: _Active, out: list[Outcome]) -> None:
        """Run the reply to its next need, collecting its events; its end or failure frees the sequence."""
        active.need = None
        try:
            for item in active.steps:
                if isinstance(item, (Verify, DraftRequest)):
                    active.need = item
                    return
                out.append((active.key, item))
        except Exception as exc:
            self._end(seq, active, out, exc)
            return
        self._end(seq, active, out, None)

    def _end(self, seq: int, active: _Active, out: list[Outcome], error: BaseException | None) -> None:
        if error is not None:
            active.steps.close()
        del self._active[seq]
        out.append((active.key, error))
