"""The draft choices that are not a file, by name: what `--draft`, a configuration's `draft`, a request's
`draft_model` or `speculative.mode` and the F3 picker say (no model library imported: the CLI's --help stays fast)."""

from __future__ import annotations

NO_DRAFT, LOOKUP, MTP = "none", "lookup", "mtp"  # plain decoding; prompt lookup; the main model's own MTP head
SOURCES = (NO_DRAFT, LOOKUP, MTP)
