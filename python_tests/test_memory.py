"""The kernels allocate nothing vocabulary-sized: every tensor produced while steer_hidden runs
is recorded by a dispatch mode (the fp64 reference, which does build [B, V] logits, shows the
check can fail). Peak bytes on a GPU are measured by bench/e2e_decode.py."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import anchor_kernels as ak
from conftest import DEVICE, kernel_backends

V, D, B = 50000, 64, 4


class LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest(backend):
    torch.manual_seed(0)
    weight = torch.randn(V, D, device=DEVICE)
    hidden = torch.randn(B, D, device=DEVICE)
    anchors = ak.AnchorSet(list(range(0, 32)), list(range(32, 64)))
    prepared = ak.prepare_anchors(weight, anchors)  # once per anchor set, outside the decode step
    with LargestOutput() as mode:
        ak.steer_hidden(hidden, weight, prepared if backend != "reference" else anchors,
                        ak.SteerConfig(steps=10, max_norm=0.5, margin=None), backend=backend)
    return mode.largest


@pytest.mark.parametrize("backend", kernel_backends())
def test_kernels_allocate_nothing_vocabulary_sized(backend):
    assert _largest(backend) <= max(B * D, 64 * 64)


def test_the_check_sees_vocabulary_sized_tensors():
    assert _largest("reference") >= B * V
