"""Smoke test of an installed wheel, run by `make sdist-check` from a directory outside the tree:
the package imports from the venv (not the checkout), the native op agrees with the reference,
the wheel is lean (stripped .so, no test fixture) and records its torch."""
import sys
from pathlib import Path

import torch

import anchor_kernels as ak
from anchor_kernels import _build_info, native

pkg = Path(ak.__file__).resolve().parent
assert pkg.is_relative_to(Path(sys.prefix).resolve()), f"imported {pkg}, not the installed wheel"
assert native.available(), native.LOAD_ERROR
assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)
(so,) = pkg.glob("_C*.so")
assert b".debug_info" not in so.read_bytes(), f"{so} carries debug info"
assert not (pkg / "models").exists(), "the fortune test fixture is in the wheel"
assert ak.lexicons.names(), "the lexicons are missing"

g = torch.Generator().manual_seed(0)
weight, hidden = torch.randn(500, 32, generator=g), torch.randn(4, 32, generator=g) * 3
anchors = ak.AnchorSet(positive=[1, 2, 3], negative=[4, 5])
config = ak.SteerConfig(steps=5)
got = ak.steer_hidden(hidden, weight, anchors, config, backend="cpu")
want = ak.steer_hidden(hidden, weight, anchors, config, backend="reference")
torch.testing.assert_close(got - hidden, want - hidden, rtol=1e-4, atol=1e-4 * (want - hidden).abs().max().item())
assert not torch.equal(got, hidden)
print(f"smoke: anchor_kernels {ak.__version__} from {pkg}, built for torch {_build_info.TORCH_VERSION}; "
      f"{so.name} {so.stat().st_size // 1024} KiB; cpu backend == reference")
