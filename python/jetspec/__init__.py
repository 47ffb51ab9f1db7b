"""jetspec: lossless tree speculative decoding with a causal parallel draft head.

The compiled ops live in ``torch.ops.jetspec`` (see :mod:`jetspec.ops` for typed
wrappers); importing this package registers them.
"""

from ._ext import WITH_CUDA
from . import ops, tree
from .drafter import Drafter, HeadDrafter
from .heads import DraftHead, load_head, save_head
from .spec import GenerationOutput, GenerationStats, SpeculativeGenerator

__version__ = "0.1.0"
__all__ = [
    "WITH_CUDA",
    "DraftHead",
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "HeadDrafter",
    "SpeculativeGenerator",
    "load_head",
    "ops",
    "save_head",
    "tree",
    "__version__",
]
