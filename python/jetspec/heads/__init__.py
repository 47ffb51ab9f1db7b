"""Draft heads: the JetSpec causal parallel head and the DFlash-style bidirectional head
(one architecture, one flag), in the published checkpoint format."""

from .checkpoint import CheckpointError, check_head_fits_target, load_head, save_head
from .config import HeadSpec, build_target_layer_ids, head_config_for
from .model import DraftHead

__all__ = [
    "CheckpointError",
    "DraftHead",
    "HeadSpec",
    "build_target_layer_ids",
    "check_head_fits_target",
    "head_config_for",
    "load_head",
    "save_head",
]
