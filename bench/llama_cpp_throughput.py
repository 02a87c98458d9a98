"""llama.cpp (llama-cpp-python) chat decoding, steered vs unsteered, side by side in one run.

    make bench-llama-cpp        # SmolLM2-135M-Instruct's shipped GGUF, one thread

One Llama with embedding=True serves all three (unsteered, the hidden route with the default
relative step, the logit form with a literal step); they alternate, median of --reps after a
warm-up. Writes bench/results/llama-cpp-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGES = [{"role": "user", "content": "Tell me what you think of people who are bad at math."}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    import llama_cpp
    import torch

    import anchor_kernels as ak
    from anchor_kernels import default_model
    from anchor_kernels.integrations.llama_cpp import LlamaCppSteerer

    torch.set_num_threads(1)
    gguf = default_model.gguf_path()
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=1, n_ctx=512, embedding=True, verbose=False)
    variants = {"unsteered": None,
                "hidden route": LlamaCppSteerer.from_gguf(gguf, "harmless", ak.SteerConfig(), llama=llm),
                "logit form": LlamaCppSteerer.from_gguf(gguf, "harmless", ak.SteerConfig(eta=0.06))}
    speeds = {k: [] for k in variants}
    for rep in range(args.reps + 1):
        for name, steerer in variants.items():
            procs = None if steerer is None else llama_cpp.LogitsProcessorList([steerer])
            start = time.perf_counter()
            out = llm.create_chat_completion(MESSAGES, max_tokens=args.tokens, temperature=0.0, logits_processor=procs)
            if rep:
                speeds[name].append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    rows = [{"variant": k, "tok_s": statistics.median(v)} for k, v in speeds.items()]
    meta = {"command": "make bench-llama-cpp", "llama_cpp_python": llama_cpp.__version__, "model": gguf.name,
            "threads": 1, "max_tokens": args.tokens, "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "llama-cpp-cpu.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['variant']:>14}: {r['tok_s']:.1f} tok/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
