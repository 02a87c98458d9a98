"""Where a steered vLLM decode step's extra time goes: the engine in this process (no engine
core subprocess), the plug-in's entry points timed per call, the fused op timed alone on the
same shapes, and a torch profile of one steered batch.

    make profile-vllm                     # the vLLM venv, on the default model; prints a table
    make profile-vllm ARGS="--batch 1"    # one request at a time

For each form: step time unsteered vs steered (median of --reps batches of --batch requests,
--tokens tokens each), the plug-in's time per step (``AnchorSteering.apply`` and, in the hidden
form, ``steer_hidden_rows``), and inside it the op's time per call. The difference between the
step-time gap and the plug-in's time is what steering costs outside the plug-in.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine core in this process


def timed(cls, name, sink):
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink[name].append(time.perf_counter() - start)
    setattr(cls, name, wrapper)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--form", choices=("logits", "hidden"), required=True)
    p.add_argument("--torch-profile", action="store_true", help="also print a torch profile of one steered batch")
    args = p.parse_args(argv)
    import torch
    import vllm

    from anchor_kernels import steer as steer_module
    from anchor_kernels.logits import LogitSteerer
    from anchor_kernels.integrations import serving
    from anchor_kernels.integrations.vllm import AnchorSteering

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"form": args.form, "sets": {"harmless": {"lexicon": "harmless"}}}, f)
    os.environ[serving.CONFIG_ENV] = f.name
    calls, inner = defaultdict(list), defaultdict(list)
    timed(AnchorSteering, "apply", calls)
    timed(AnchorSteering, "steer_hidden_rows", calls)
    # What the plug-in calls: the public entry points (checks, then the op).
    timed(steer_module, "steer_hidden", inner)
    timed(LogitSteerer, "apply_", inner)

    llm = vllm.LLM(model=args.model, dtype="float32", max_model_len=512, max_num_seqs=args.batch, seed=0,
                   logits_processors=[AnchorSteering])
    prompt = "Tell me what you think of people who are bad at math."
    kinds = {"unsteered": None, "steered": {"anchor_set": "harmless"}}
    steps = {k: [] for k in kinds}
    plug = {k: [] for k in kinds}
    entry = {k: [] for k in kinds}
    for rep in range(args.reps + 1):
        for kind, extra in kinds.items():
            calls.clear()
            inner.clear()
            sp = vllm.SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, extra_args=extra)
            start = time.perf_counter()
            llm.generate([prompt] * args.batch, sp, use_tqdm=False)
            dt = time.perf_counter() - start
            if rep:
                steps[kind].append(dt / args.tokens)
                plug[kind].append(sum(sum(v) for v in calls.values()) / args.tokens)
                entry[kind].append(sum(sum(v) for v in inner.values()) / args.tokens)
    un, st = (statistics.median(steps[k]) for k in kinds)
    pl_un, pl_st = (statistics.median(plug[k]) for k in kinds)
    en_st = statistics.median(entry["steered"])
    print(f"form {args.form}, B={args.batch}: step {un * 1e3:.2f} ms unsteered, {st * 1e3:.2f} ms steered "
          f"(+{(st - un) * 1e3:.2f} ms, {100 * (st / un - 1):+.1f}%); plug-in per step {pl_un * 1e3:.3f} ms "
          f"unsteered, {pl_st * 1e3:.3f} ms steered, of which {en_st * 1e3:.3f} ms in steer_hidden / LogitSteerer.apply_; "
          f"outside the plug-in: {((st - un) - (pl_st - pl_un)) * 1e3:+.2f} ms")
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        sp = vllm.SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, extra_args=kinds["steered"])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate([prompt] * args.batch, sp, use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    os.unlink(f.name)


if __name__ == "__main__":
    sys.exit(main())
