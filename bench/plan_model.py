"""A performance model (modelled, not measured) of the hidden-state op's CUDA plans at decode
shapes on an H100, next to the single-launch Hopper cluster design that issue 22 names as the
next step. No GPU is needed; the numbers are only as good as the constants below.

    python bench/plan_model.py          # writes bench/results/plan-model.md

Per call, bf16, T = 10 K-space steps, one anchor set:
- floor: max(bytes that must move / HBM bandwidth, one launch): read h0 and write h' (2 B d),
  read W_A once (K d) and the Gram (K^2 fp32), as bench/sweep.py's floor.
- tiled (today's CUDA plan when the GPU is busy enough): one block per row; each block reads its
  set's W_A twice (z0 = W_A h0, then h' = h0 + W_A^T c) through its SM's load path; blocks beyond
  the SMs queue. T dependent steps per row.
- split-d: two launches of (row, d-slice) blocks; each block reads its slice of W_A once per
  launch (16-byte loads, two anchors in flight per warp); the finish launch runs the T steps
  redundantly per slice.
- today's CUDA auto: ``ak_cuda_split_slices`` (csrc/kernels/steer_cpu.cpp) evaluates this same
  model for the tiled plan and every slice count and takes the cheapest (``split_slices`` here).
- cluster (the design): one launch; a thread-block cluster of up to 16 CTAs per group of rows,
  each CTA holding its d-slice of W_A in shared memory, read from HBM/L2 once and used for both
  z0 and h'; partial z0 reduced over distributed shared memory (one DSMEM round trip); the T
  steps once per cluster, per warp with shuffles.
"""
from __future__ import annotations

import math
from pathlib import Path

HBM = 3.35e12          # B/s, H100 SXM
L2 = 5.5e12            # B/s, aggregate L2 read bandwidth
SM_LOAD = 64 * 1.755e9  # B/s one SM can load (64 B/clk at 1.755 GHz)
SMS = 132
LAUNCH = 2.5e-6        # s, one kernel launch on a stream (less inside a CUDA graph)
DSMEM = 0.5e-6         # s, one reduction round trip over distributed shared memory
CLUSTER = 16           # CTAs per cluster (non-portable size; 8 portable)
SMEM = 200 * 1024      # B of shared memory a CTA may hold for its W_A slice
T = 10
MIN_SLICE, OCCUPANCY = 256, 2                  # ak_cuda_split_slices
BYTES = 2                                      # bf16


def step(K):
    """Dependent K-space step latency (bench/sweep.py: ~0.1 us to K = 64, ~0.3 us at K = 256)."""
    return 0.1e-6 + max(0, K - 64) * 1.04e-9


def floor(B, d, K):
    return max((2 * B * d * BYTES + K * d * BYTES + 4 * K * K) / HBM, LAUNCH)


def tiled(B, d, K):
    waves = math.ceil(B / SMS)
    per_block = 2 * (K * d + d) * BYTES / SM_LOAD            # W_A twice, h0 and h'
    l2 = 2 * B * K * d * BYTES / L2                           # every block's W_A reads through L2
    return LAUNCH + max(waves * per_block, l2) + waves * T * step(K)


def split_d(B, d, K, s):
    waves = math.ceil(B * s / (OCCUPANCY * SMS))
    per_block = (K * d / s + d / s) * BYTES / SM_LOAD
    l2 = B * K * d * BYTES / L2
    launch = 2 * LAUNCH + max(waves * per_block, l2)           # partial sums
    return launch + max(waves * per_block, l2) + waves * T * step(K)   # finish: W_A again, T steps


def split_slices(B, d, K):
    """ak_cuda_split_slices: 1 (tiled) or the slice count this model says is fastest."""
    times = {1: tiled(B, d, K)} | {s: split_d(B, d, K, s) for s in range(2, -(-d // MIN_SLICE) + 1)}
    return min(times, key=lambda s: (times[s], s))


def cluster(B, d, K):
    clusters = SMS // CLUSTER                                  # resident at once
    rows_per_cluster = -(-B // clusters)
    slice_bytes = K * d * BYTES / CLUSTER
    # A slice that does not fit in shared memory is streamed for z0 and again for h', per row tile.
    reads = 1 if slice_bytes <= SMEM else 2 * -(-rows_per_cluster // 16)   # per 16-row tile
    load = max(reads * slice_bytes / SM_LOAD, reads * min(B, clusters) * K * d * BYTES / L2, K * d * BYTES / HBM)
    rows = rows_per_cluster * 2 * d / CLUSTER * BYTES / SM_LOAD   # each CTA streams its rows' slices
    return LAUNCH + load + rows + DSMEM + T * step(K)


def main():
    shapes = [(B, d, K) for B in (1, 8, 64, 256) for d in (2048, 4096, 8192) for K in (16, 64, 256)]
    lines = ["Modelled (no GPU has measured these): H100 SXM constants in `bench/plan_model.py`, bf16, "
             f"T = {T}, one set; times in µs and as multiples of the floor.", "",
             "| B | d | K | floor µs | tiled | split-d (slices) | today's CUDA auto | cluster design |",
             "|---|---|---|---|---|---|---|---|"]
    ratios = {"auto": [], "cluster": []}
    for B, d, K in shapes:
        f, t, c = floor(B, d, K), tiled(B, d, K), cluster(B, d, K)
        slices = split_slices(B, d, K)
        best_split = min(range(2, -(-d // MIN_SLICE) + 1), key=lambda s: split_d(B, d, K, s))
        s = split_d(B, d, K, best_split)
        auto = t if slices == 1 else split_d(B, d, K, slices)
        ratios["auto"].append(auto / f)
        ratios["cluster"].append(c / f)
        lines.append(f"| {B} | {d} | {K} | {f * 1e6:.2f} | {t / f:.1f}x | {s / f:.1f}x ({best_split}) | "
                     f"{auto / f:.1f}x ({'tiled' if slices == 1 else f'{slices} slices'}) | {c / f:.1f}x |")
    med = {k: sorted(v)[len(v) // 2] for k, v in ratios.items()}
    lines += ["", f"Today's CUDA auto (tiled or split-d; the Triton batched plan is not modelled): {min(ratios['auto']):.1f}-{max(ratios['auto']):.1f}x the floor (median "
              f"{med['auto']:.1f}x); cluster design: {min(ratios['cluster']):.1f}-{max(ratios['cluster']):.1f}x "
              f"(median {med['cluster']:.1f}x)."]
    out = Path(__file__).resolve().parent / "results" / "plan-model.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
