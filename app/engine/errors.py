"""Errors a user can act on. Anything raised as TandemError is shown as one line, never a traceback."""


class TandemError(Exception):
    """A problem the user can fix: its message says what happened and what to do."""


class ModelFileError(TandemError):
    """A model path that is missing, not a file, not GGUF, or damaged."""


class IncompatibleDraftError(TandemError):
    """The draft model cannot propose tokens the main model understands."""


class ContextOverflowError(TandemError):
    """The prompt does not fit in the context window."""


class LoadCancelled(TandemError):
    """A load called off before it finished (the app quit, or the user picked another pair)."""
