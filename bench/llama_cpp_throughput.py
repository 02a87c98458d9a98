"""llama.cpp (llama-cpp-python) chat decoding, steered vs unsteered, side by side in one run.

    make bench-llama-cpp        # SmolLM2-135M-Instruct's shipped GGUF, one thread

One Llama with embedding=True serves every variant: unsteered, the hidden route (the default
relative step, ||h0|| from llama.cpp's hidden state), the logit form (a literal step), both also
with the mixing matrix in bf16 (``mixing_dtype=torch.bfloat16``; fp32 is the default), and
logit_bias (llama-cpp-python's own per-token bias processor, +-1 on the same set's anchors: the
cheapest Python processor that can run where the steering runs, the yardstick for its glue) and
a processor that returns the logits untouched (what llama-cpp-python charges for any processor:
with one it samples in Python over the whole vocabulary instead of in llama.cpp's own chain).
Each decodes exactly --tokens tokens after the chat prompt (``Llama.generate``, greedy, EOS not
stopping it); they alternate for --reps reps after a warm-up, and each reports its median time
per decode step. Writes
bench/results/llama-cpp-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGES = [{"role": "user", "content": "Tell me what you think of people who are bad at math."}]


def logit_bias_processor(bias: dict[int, float]):
    """llama-cpp-python's own logit_bias processor (Llama._create_completion, 0.3.x), as it runs there."""
    import numpy as np

    def processor(input_ids, scores):
        new_scores = np.copy(scores)
        for token, value in bias.items():
            new_scores[token] = value + scores[token]
        return new_scores
    return processor


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    import llama_cpp
    import numpy as np
    import torch

    import anchor_kernels as ak
    from anchor_kernels import default_model
    from anchor_kernels.integrations.llama_cpp import LlamaCppSteerer, gguf_tokenizer

    torch.set_num_threads(1)
    gguf = default_model.gguf_path()
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=1, n_ctx=512, embedding=True, verbose=False)
    tok = gguf_tokenizer(gguf)
    anchors = ak.AnchorSet.from_lexicon(tok, "harmless")
    bias = {**{t: 1.0 for t in anchors.positive}, **{t: -1.0 for t in anchors.negative}}
    hidden, logit, bf16 = ak.SteerConfig(), ak.SteerConfig(eta=0.06), torch.bfloat16
    variants = {"unsteered": None,
                # the default fp32 M (the head is dequantised), and the opt-in bf16 M beside it
                "hidden route": LlamaCppSteerer.from_gguf(gguf, anchors, hidden, llama=llm),
                "hidden, bf16 M": LlamaCppSteerer.from_gguf(gguf, anchors, hidden, llama=llm, mixing_dtype=bf16),
                "logit form": LlamaCppSteerer.from_gguf(gguf, anchors, logit),
                "logit, bf16 M": LlamaCppSteerer.from_gguf(gguf, anchors, logit, mixing_dtype=bf16),
                "logit_bias": logit_bias_processor(bias),
                "no-op processor": lambda input_ids, scores: scores}
    prompt = llm.tokenize(tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True).encode(),
                          add_bos=False, special=True)
    speeds = {k: [] for k in variants}
    inside = {k: [] for k in variants}   # seconds spent in the processor itself, per token
    edited = {k: [] for k in variants}   # whether it changed the logits (outside the timing)

    def timed(name, processor):
        def call(input_ids, scores):
            before = np.array(scores)
            start = time.perf_counter()
            out = processor(input_ids, scores)
            inside[name].append(time.perf_counter() - start)
            edited[name].append(not np.array_equal(before, out))
            return out
        return call

    for rep in range(args.reps + 1):
        for name, processor in variants.items():
            procs = None if processor is None else llama_cpp.LogitsProcessorList([timed(name, processor)])
            tokens = llm.generate(prompt, temp=0.0, logits_processor=procs)
            next(tokens)                           # the prompt's evaluation is not a decode step
            last = time.perf_counter()
            for _ in range(args.tokens):
                next(tokens)
                now = time.perf_counter()
                if rep:
                    speeds[name].append(now - last)
                last = now
            tokens.close()
    # The median decode step over every token of every rep: robust to the slow spells of a
    # shared machine, which a mean over whole runs is not.
    step = {k: statistics.median(v) for k, v in speeds.items()}
    rows = [{"variant": k, "tok_s": 1 / t, "overhead_pct": 100 * (t / step["unsteered"] - 1),
             "in_processor_ms": 1e3 * statistics.mean(inside[k]) if inside[k] else 0.0,
             "in_processor_pct": 100 * statistics.mean(inside[k]) / step["unsteered"] if inside[k] else 0.0,
             "edited_pct": 100 * statistics.mean(edited[k]) if edited[k] else 0.0,
             # the processor's median time on the tokens it edited and on those it left alone
             **{f"{kind}_median_ms": 1e3 * statistics.median(times) if times else 0.0
                for kind, times in (("edited", [s for s, e in zip(inside[k], edited[k]) if e]),
                                    ("unedited", [s for s, e in zip(inside[k], edited[k]) if not e]))}}
            for k, t in step.items()]
    meta = {"command": "make bench-llama-cpp", "llama_cpp_python": llama_cpp.__version__, "model": gguf.name,
            "threads": 1, "tokens": args.tokens, "reps": args.reps, "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "llama-cpp-cpu.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['variant']:>15}: {r['tok_s']:.1f} tok/s ({r['overhead_pct']:+.1f}%), in the processor "
              f"{r['in_processor_ms']:.3f} ms per token on average ({r['in_processor_pct']:.1f}% of an unsteered "
              f"step), logits changed at {r['edited_pct']:.0f}% of tokens (median {r['edited_median_ms']:.3f} ms "
              f"there, {r['unedited_median_ms']:.3f} ms elsewhere)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
