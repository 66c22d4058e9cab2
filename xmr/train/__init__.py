"""Training: the authors optimisation recipe for every model kind."""

from xmr.train.trainer import TrainConfig, is_run_directory, train

__all__ = ["TrainConfig", "is_run_directory", "train"]
