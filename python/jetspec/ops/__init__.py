"""The ``torch.ops.jetspec`` custom ops: typed wrappers, fake impls, PyTorch references, and the one
place that decides kernel or reference (:func:`supports`).

Each op's contract (schema, shapes, dtypes) is written once, next to its registration and CPU kernel
in ``cpp/<op>.cpp``; its typed wrapper and fake impl are in ``jetspec/ops/<op>.py``, its reference in
:mod:`jetspec.ops.reference`. Other engines can call ``torch.ops.jetspec.<op>`` directly; the wrappers
add the allocation of outputs and fall back to the reference where the build has no kernel for the
arguments (with a warning when the device has none at all).
"""

from . import reference, tree
from .accept_greedy import accept_greedy
from .accept_sample import accept_sample
from .build_tree import build_tree
from .draft_topk import draft_topk
from .kv_compact import kv_compact
from .library import LIMITS, WITH_CUDA, has_kernel, supports
from .rms_norm import rms_norm
from .skinny_gemm import Epilogue, skinny_gemm
from .tree import Tree
from .tree_attention import tree_attention, tree_attention_supports

__all__ = [
    "Epilogue",
    "LIMITS",
    "Tree",
    "WITH_CUDA",
    "accept_greedy",
    "accept_sample",
    "build_tree",
    "draft_topk",
    "has_kernel",
    "kv_compact",
    "reference",
    "rms_norm",
    "skinny_gemm",
    "supports",
    "tree",
    "tree_attention",
    "tree_attention_supports",
]
