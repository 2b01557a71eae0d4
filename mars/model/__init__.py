"""The SemVIE transformer and its checkpoint formats."""

from mars.model.semvie import KVCache, SemVIE

__all__ = ["KVCache", "SemVIE"]
