"""Shape sweep of steer_hidden per backend, each time next to its floor.

    python bench/sweep.py                      # GPU: B{1,8,64,256} x d{2048,4096,8192} x K{16,64,256} x T{1,10,50}, bf16
    python bench/sweep.py --quick              # a few small shapes (what CI runs, on CPU)
    python bench/sweep.py --decode             # decode shapes only (make gpu-check)

floor = max(bytes that must move / measured bandwidth, latency of an empty launch). Bytes: read
hidden and write h' (B*d each), read the K anchor rows once (K*d) and the Gram (K*K fp32).
loop_floor = max(floor, bytes / bandwidth + T x step latency): the K-space steps are dependent,
so T = 50 cannot reach the byte floor; step latency is modelled (GPU: 0.1 us per step up to
K = 64, 0.3 us at K = 256; CPU: 0). Triton runs once per plan ("triton" = the automatic choice,
"triton:tiled", "triton:split_d" forced through $ANCHOR_KERNELS_TRITON_PLAN).
Bandwidth is measured in the same run with a large device copy. GPU times are medians from
triton.testing.do_bench (CUDA events); CPU times are medians of perf_counter. Results go to
bench/results/sweep-<device>.json plus a markdown table beside it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import os

import anchor_kernels as ak
from anchor_kernels.steer import unavailable_reason

STEP_US = {16: 0.1, 64: 0.1, 256: 0.3}   # modelled latency of one dependent K-space step on a GPU
PLANS = ("tiled", "split_d")

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(B=(1, 8, 64, 256), d=(2048, 4096, 8192), K=(16, 64, 256), T=(1, 10, 50))
QUICK = dict(B=(1, 8), d=(256,), K=(16, 64), T=(1, 10))
# The decode shapes most worth timing when a GPU is lent for minutes (make gpu-check).
DECODE = dict(B=(1, 8, 64), d=(4096,), K=(16, 64, 256), T=(10,))
VOCAB = 32000


def median_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bandwidth_gbps(device) -> float:
    """A large copy: 2 x bytes moved over the median time."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * n / (ms * 1e-3) / 1e9


def empty_launch_ms(device) -> float:
    if device.type != "cuda":
        return 0.0
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(x_ptr):
        pass

    x = torch.empty(1, device=device)
    return median_ms(lambda: _empty[(1,)](x), device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few small shapes (CI on CPU)")
    parser.add_argument("--decode", action="store_true", help="decode shapes only: B 1/8/64, d 4096, T 10")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="auto", help="comma list, or auto = all that run here")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--objective", default="lse", choices=("lse", "mean"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ([b for b in ("cpu", "cuda", "triton") if unavailable_reason(b, device) is None]
             if args.backends == "auto" else args.backends.split(","))
    if "triton" in names and device.type == "cuda":
        names += [f"triton:{p}" for p in PLANS]
    grid = QUICK if args.quick else DECODE if args.decode else FULL
    bw, launch = bandwidth_gbps(device), empty_launch_ms(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}), "
          f"copy bandwidth {bw:.1f} GB/s, empty launch {launch * 1e3:.1f} us, backends {names}")
    rows = []
    for d, K in itertools.product(grid["d"], grid["K"]):
        g = torch.Generator().manual_seed(0)
        weight = (torch.randn(VOCAB, d, generator=g) / math.sqrt(d)).to(dtype).to(device)
        perm = torch.randperm(VOCAB, generator=g).tolist()
        prepared = ak.prepare_anchors(weight, ak.AnchorSet(perm[: K // 2], perm[K // 2: K]))
        for B, T in itertools.product(grid["B"], grid["T"]):
            hidden = (torch.randn(B, d, generator=g) * 4).to(dtype).to(device)
            config = ak.SteerConfig(steps=T, objective=args.objective)
            size = torch.tensor([], dtype=dtype).element_size()
            moved = 2 * B * d * size + K * d * size + K * K * 4
            floor = max(moved / (bw * 1e9) * 1e3, launch)
            step_ms = STEP_US[K] * 1e-3 if device.type == "cuda" else 0.0
            loop_floor = max(floor, moved / (bw * 1e9) * 1e3 + T * step_ms)
            row = dict(B=B, d=d, K=K, T=T, dtype=str(dtype), bytes=moved, floor_ms=floor, loop_floor_ms=loop_floor)
            for name in names:
                backend, _, plan = name.partition(":")
                if plan:
                    os.environ["ANCHOR_KERNELS_TRITON_PLAN"] = plan
                try:
                    ms = median_ms(lambda: ak.steer_hidden(hidden, weight, prepared, config, backend=backend), device)
                    row[f"{name}_ms"], row[f"{name}_x_floor"] = ms, ms / floor
                    row[f"{name}_x_loop_floor"] = ms / loop_floor
                except RuntimeError as exc:  # a documented limit, e.g. triton's K <= 256
                    row[f"{name}_ms"], row[f"{name}_x_floor"] = None, str(exc).split(";")[0]
                    row[f"{name}_x_loop_floor"] = None
                finally:
                    os.environ.pop("ANCHOR_KERNELS_TRITON_PLAN", None)
            rows.append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    meta = dict(device=str(device), name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                torch=torch.__version__, cuda=torch.version.cuda, bandwidth_gbps=bw, empty_launch_ms=launch,
                command="python bench/sweep.py" + (" --quick" if args.quick else "") + f" --objective {args.objective}",
                backends=names, objective=args.objective)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    suffix = ("-quick" if args.quick else "") + ("-mean" if args.objective == "mean" else "")
    out = args.out or RESULTS / f"sweep-{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    header = ["B", "d", "K", "T", "floor_ms", "loop_floor_ms"] + [f"{n}_{c}" for n in names
                                                                   for c in ("ms", "x_floor", "x_loop_floor")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in header) + " |")
    out.with_suffix(".md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
