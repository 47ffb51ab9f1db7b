"""Training draft heads: self-distilled data, the trainer, and acceptance measured by replay."""

from .acceptance import evaluate_acceptance, matched_depth, replay_acceptance
from .blocks import anchored_blocks, block_mask
from .distill import TrainingSequence, load_sequences, save_sequences, self_distill
from .trainer import HeadTrainer, StepMetrics, TrainConfig, TrainState

__all__ = [
    "HeadTrainer",
    "StepMetrics",
    "TrainConfig",
    "TrainState",
    "TrainingSequence",
    "anchored_blocks",
    "block_mask",
    "evaluate_acceptance",
    "load_sequences",
    "matched_depth",
    "replay_acceptance",
    "save_sequences",
    "self_distill",
]
