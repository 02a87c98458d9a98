"""A small run of every GPU path, for compute-sanitizer: cuda and triton backends, every plan
(tiled, split-d, rank-one mean), every dtype, mixed banks with untouched rows, large sets, the
backward, odd d, and the logit-form op on both GPU implementations."""
import math
import os

import torch

import anchor_kernels as ak

dev = torch.device("cuda")
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for d, K in ((7, 5), (256, 64), (1000, 129), (4096, 256)):
        weight = (torch.randn(K + 50, d, device=dev) / math.sqrt(d)).to(dtype)
        bank = ak.AnchorBank([ak.AnchorSet(list(range(K // 2)), list(range(K // 2, K))), ak.AnchorSet([K], [K + 1])])
        hidden = (torch.randn(19, d, device=dev) * 3).to(dtype)
        row_sets = torch.randint(-1, 2, (19,), device=dev)
        for backend in ("cuda", "triton"):
            for plan in ("tiled", "split_d"):
                os.environ["ANCHOR_KERNELS_CUDA_PLAN"] = os.environ["ANCHOR_KERNELS_TRITON_PLAN"] = plan
                for config in (ak.SteerConfig(steps=5, max_norm=0.3),
                               ak.SteerConfig(steps=3, strength=0.01, objective="mean")):
                    out = ak.steer_hidden(hidden, weight, bank, config, backend=backend, row_sets=row_sets)
                    assert torch.isfinite(out.float()).all()
        logits = (hidden.float() @ weight.float().T).to(dtype)
        for backend in ("cuda", "triton"):
            steerer = ak.LogitSteerer(weight, bank, ak.SteerConfig(steps=4, eta=0.3), backend=backend)
            assert torch.isfinite(steerer(logits, row_sets=row_sets).float()).all()
h = torch.randn(4, 64, device=dev, requires_grad=True)
w = torch.randn(80, 64, device=dev)
ak.steer_hidden(h, w, ak.AnchorSet([1, 2], [3]), backend="cuda").sum().backward()
torch.cuda.synchronize()
print("gpu smoke: ok")
