"""The C++ CPU kernels at the engines' decode shapes, each next to the bytes it must read.

    python bench/cpu_floor.py            # SmolLM2-135M shapes (d = 576, V = 49152, K = 111), one thread
    python bench/cpu_floor.py --quick    # fewer repeats (what the test runs)

Issue 22, item 2. Per call the hidden-state op must read the anchor rows W_A once (K x d) and
read/write the rows (2 x B x d); the logit form must read M (K x V fp32) once and read/write the
logits (2 x B x V). floor = those bytes / the copy bandwidth measured in the same run with a
buffer larger than the last-level cache (W_A of 111 x 576 fits in cache, so the hidden op can
beat that floor; M of 21.8 MB cannot). One torch thread, as the engines run the op. Times are
medians of perf_counter; results go to bench/results/cpu-floor.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import anchor_kernels as ak

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = dict(d=576, V=49152, K=111)   # SmolLM2-135M-Instruct, the positive_sentiment lexicon's size
BATCHES = (1, 8)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gbps(repeats: int) -> float:
    src = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MB: past any last-level cache here
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src), repeats) * 1e-3) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu-floor.json")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 50
    torch.set_num_threads(1)
    d, V, K = SHAPE["d"], SHAPE["V"], SHAPE["K"]
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, d, generator=gen) / d ** 0.5
    anchors = ak.AnchorSet(list(range(0, K // 2)), list(range(K // 2, K)))
    prepared = ak.prepare_anchors(weight, anchors)
    # The plain loop (margin=None): every call edits every row, the worst case. Gated (the
    # default), a row already past its margin is not edited and M is not read at all.
    plain = ak.SteerConfig(margin=None)
    steerer = ak.LogitSteerer(weight, anchors, ak.SteerConfig(eta=0.06, margin=None), backend="cpu")
    bw = copy_gbps(repeats)
    rows = []
    for B in BATCHES:
        hidden = torch.randn(B, d, generator=gen) * 4
        logits = hidden @ weight.T
        for form, fn, moved in (
                ("hidden", lambda: ak.steer_hidden(hidden, weight, prepared, plain, backend="cpu"), 4 * (K * d + 2 * B * d)),
                ("logits", lambda: steerer.apply_(logits), 4 * (K * V + 2 * B * V))):
            ms = median_ms(fn, repeats)
            floor = moved / (bw * 1e9) * 1e3
            rows.append(dict(form=form, B=B, d=d, V=V, K=K, bytes=moved, ms=ms, floor_ms=floor, x_floor=ms / floor))
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
    meta = dict(cpu=platform.processor() or platform.machine(), torch=torch.__version__, threads=1,
                copy_gbps=bw, command="python bench/cpu_floor.py" + (" --quick" if args.quick else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    header = ["form", "B", "bytes", "ms", "floor_ms", "x_floor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in header) + " |"
              for r in rows]
    args.out.with_suffix(".md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
