"""Training: the authors optimisation recipe for every model kind."""

from xmr.train.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
