"""The SemVIE transformer and its checkpoint formats."""

__all__ = ["KVCache", "SemVIE"]


def __getattr__(name: str):
    # imported when asked for: the package's CLI (`mars init`, `mars average`) registers without torch
    if name in __all__:
        from mars.model import semvie

        return getattr(semvie, name)
    raise AttributeError(f"module 'mars.model' has no attribute {name!r}")
