import pytest
import torch

import jetspec

HAS_CUDA = torch.cuda.is_available() and jetspec.WITH_CUDA

#: Devices every op test runs on: the CPU kernels always, the CUDA kernels where there is a GPU.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of jetspec")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A seeded generator, so a failure reproduces."""
    return torch.Generator().manual_seed(1234)
