"""Multi-stage MARS training: stages (what trains), one trainer (one process or torchrun + FSDP2),
atomic checkpoints. Entry point: `mars train CONFIG.yaml [key=value ...]`."""

from mars.train.config import DataConfig, TrainConfig, load_train_config
from mars.train.stages import set_trainable

__all__ = ["DataConfig", "TrainConfig", "load_train_config", "set_trainable"]
