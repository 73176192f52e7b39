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
