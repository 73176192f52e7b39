"""Tandem: speculative decoding for local GGUF models, in one terminal app."""

__version__ = "0.1.0"
