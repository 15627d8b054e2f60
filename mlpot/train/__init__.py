"""mlpot.train: config schema, training loop, losses, metrics, checkpoints, data parallelism.

    >>> from mlpot.train import load_config, train
    >>> metrics = train(load_config("configs/quickstart.yaml", ["output=runs/qs"]))
"""
from mlpot.train.config import load_config, validate_config
from mlpot.train.losses import WeightedLoss
from mlpot.train.trainer import Trainer, train

__all__ = ["load_config", "validate_config", "WeightedLoss", "Trainer", "train"]
