"""Training: the authors optimisation recipe for every model kind."""

from xmr.train.trainer import TrainConfig, default_config, is_run_directory, train

__all__ = ["TrainConfig", "default_config", "is_run_directory", "train"]
