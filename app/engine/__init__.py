"""The engine: llama.cpp contexts, drafting, verification, stats. Knows nothing of any UI."""

from app.engine.errors import TandemError

__all__ = ["TandemError"]
