"""Loads the compiled extension, which registers the ``torch.ops.jetspec`` ops."""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "jetspec's compiled extension (jetspec._C) could not be loaded. It must be built against the "
        f"installed torch ({torch.__version__}); reinstall with `pip install --no-build-isolation .` "
        f"after installing torch. Original error: {err}"
    ) from err

#: True when the extension was compiled with its CUDA kernels.
WITH_CUDA: bool = bool(_C.WITH_CUDA)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.jetspec.<op>`` has a compiled kernel for ``device``'s type."""
    return _has_kernel(op, device.type)


# Fixed once the extension is loaded: torch.compile takes the answer as a constant instead of tracing
# the dispatcher query.
@torch.compiler.assume_constant_result
def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"jetspec::{op}", key)
