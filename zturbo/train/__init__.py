"""Training: loop, losses, EMA, checkpoints, LR schedule and distributed glue."""

from zturbo.train.bench import benchmark_step
from zturbo.train.distributed import DistContext
from zturbo.train.engine import NonFiniteLossError, TrainEngine
from zturbo.train.loop import Trainer, TrainResult, train

__all__ = [
    "DistContext",
    "NonFiniteLossError",
    "TrainEngine",
    "TrainResult",
    "Trainer",
    "benchmark_step",
    "train",
]
