"""Training a found architecture from scratch on the papers' evaluation networks.

    from fastnas.train import TrainConfig, load_architecture, train
    arch = load_architecture("runs/darts-digits")
    result = train(TrainConfig.create(arch.space, "digits", genotype=arch.genotype), out_dir="runs/train-darts-digits")
    print(result.report["test_accuracy"])

``Trainer.resume(out_dir)`` continues an interrupted training exactly where its
last checkpoint left it.
"""

from fastnas.errors import TrainError
from fastnas.train.architecture import Architecture, build_eval_network, load_architecture
from fastnas.train.config import DATASETS, SPACES, TrainConfig
from fastnas.train.trainer import Trainer, TrainResult, train

__all__ = [
    "DATASETS",
    "SPACES",
    "Architecture",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "build_eval_network",
    "load_architecture",
    "train",
]
