"""Multi-stage MARS training: stages (what trains), one trainer (one process or torchrun + FSDP2),
atomic checkpoints. Entry point: `mars train CONFIG.yaml [key=value ...]`."""

__all__ = ["DataConfig", "TrainConfig", "load_train_config", "set_trainable"]

_LAZY = {"DataConfig": "mars.train.config", "TrainConfig": "mars.train.config",
         "load_train_config": "mars.train.config", "set_trainable": "mars.train.stages"}


def __getattr__(name: str):
    # imported when asked for: the package's CLI (`mars train`, ...) registers without torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mars.train' has no attribute {name!r}")
