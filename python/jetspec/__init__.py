"""jetspec: lossless tree speculative decoding with a causal parallel draft head.

The compiled ops live in ``torch.ops.jetspec`` (see :mod:`jetspec.ops` for typed wrappers and
references); importing this package registers them. The package stacks one way:
``ops`` -> ``layers`` -> ``heads`` -> ``runtime`` -> ``training`` / ``assets`` -> ``cli``.
"""

from . import ops
from .heads import DraftHead, load_head, save_head
from .ops import WITH_CUDA, tree
from .runtime import Drafter, GenerationOutput, GenerationStats, HeadDrafter, SpeculativeGenerator

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
