"""The draft choices that are not a file, by name: what `--draft`, a configuration's `draft`, a request's
`draft_model` or `speculative.mode` and the F3 picker say (no model library imported: the CLI's --help stays fast)."""

from __future__ import annotations

NO_DRAFT, LOOKUP, MTP = "none", "lookup", "mtp"  # plain decoding; prompt lookup; the main model's own MTP head
SOURCES = (NO_DRAFT, LOOKUP, MTP)
DRAFT_MODEL = "model"  # the round source a draft model file drafts as (the controller's name for it)


def draws_on(draft: str) -> frozenset[str]:
    """The round sources a draft choice drafts from: prompt lookup rides along with a draft model or an MTP head (the
    controller picks per round) and stands in when there is neither; plain decoding draws on none."""
    if draft == NO_DRAFT:
        return frozenset()
    if draft == LOOKUP:
        return frozenset({LOOKUP})
    return frozenset({MTP if draft == MTP else DRAFT_MODEL, LOOKUP})


def within(wanted: str, loaded: str) -> frozenset[str] | None:
    """The sources a reply asking for draft choice `wanted` drafts from on a pair loaded with `loaded`, when that pair
    has them all (plain decoding, lookup, the head, on a pair that has them: one more sequence in its batch); None when
    it has not, or `wanted` is a draft file (a pair of its own)."""
    if wanted not in SOURCES:
        return None
    sources = draws_on(wanted)
    return sources if sources <= draws_on(loaded) else None
