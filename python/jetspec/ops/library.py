"""The compiled extension, which registers the ``torch.ops.jetspec`` ops, and the one place that
decides whether an op runs its compiled kernel or the PyTorch reference."""

from __future__ import annotations

import warnings

import torch

try:
    from .. import _C
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "jetspec's compiled extension (jetspec._C) could not be loaded. It must be built against the "
        f"installed torch ({torch.__version__}); reinstall with `pip install --no-build-isolation .` "
        f"after installing torch. Original error: {err}"
    ) from err

__all__ = ["WITH_CUDA", "LIMITS", "has_kernel", "supports", "use_kernel"]

#: True when the extension was compiled with its CUDA kernels.
WITH_CUDA: bool = bool(_C.WITH_CUDA)

#: The ops' size limits as the extension states them: ``{op: {device type: {name: value}}}``, e.g.
#: ``LIMITS["build_tree"]["cuda"]["nodes"]``. An op or device type absent here has no size limit.
LIMITS: dict[str, dict[str, dict[str, int | tuple[int, ...]]]] = _C.LIMITS

_warned: set[tuple[str, str]] = set()


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``torch.ops.jetspec.<op>`` has a compiled kernel for ``device``'s type."""
    return _has_kernel(op, device.type)


# Fixed once the extension is loaded: torch.compile takes the answer as a constant instead of tracing
# the dispatcher query.
@torch.compiler.assume_constant_result
def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"jetspec::{op}", key)


def supports(op: str, device: torch.device, **sizes: int) -> bool:
    """Whether ``op`` runs a compiled kernel on ``device`` for these sizes, each at most the limit of
    that name in :data:`LIMITS` (e.g. ``supports("build_tree", dev, depth=15, width=8, nodes=64)``)."""
    if not has_kernel(op, device):
        return False
    limits = LIMITS.get(op, {}).get(device.type, {})
    return all(value <= limits[name] for name, value in sizes.items() if name in limits)


def use_kernel(op: str, device: torch.device, **sizes: int) -> bool:
    """:func:`supports`, warning once per (op, device type) when the compiled kernel is missing (the typed
    wrappers then run the slower reference, which may synchronise with the host)."""
    if supports(op, device, **sizes):
        return True
    if not has_kernel(op, device) and (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(
            f"jetspec: no compiled {device.type} kernel for '{op}' in this build; using the PyTorch reference "
            "(slower, synchronizes with the host)",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
