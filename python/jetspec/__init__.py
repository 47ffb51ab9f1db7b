"""jetspec: lossless tree speculative decoding with a causal parallel draft head.

The compiled ops live in ``torch.ops.jetspec`` (see :mod:`jetspec.ops` for typed
wrappers); importing this package registers them.
"""

from ._ext import WITH_CUDA
from . import ops

__version__ = "0.1.0"
__all__ = ["WITH_CUDA", "ops", "__version__"]
