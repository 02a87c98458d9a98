"""HF transformers generate, steered vs unsteered, side by side in one run, with the yardstick.

    make bench-hf       # the default model (SmolLM2-135M-Instruct, fp32), one torch thread

Variants, alternating, median of --reps after a warm-up, every request decoding exactly --tokens
tokens (EOS suppressed by min_new_tokens): unsteered; the hidden hook (``ak.hf.steer``,
``SteerConfig()``); the logit form (``AnchorLogitsProcessor``, ``SteerConfig(eta=0.06)``); and
``sequence_bias`` (transformers' built-in per-token bias, +-1 on the same set's anchors: the
cheapest thing that runs where the steering runs, the yardstick). Writes
bench/results/hf-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Tell me what you think of people who are bad at math."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--lexicon", default="harmless")
    args = p.parse_args(argv)
    import contextlib

    import torch
    import transformers

    import anchor_kernels as ak
    from anchor_kernels import default_model, generation

    torch.set_num_threads(1)
    model, tok = generation.load_model(default_model.ensure(verbose=False))
    anchors = ak.AnchorSet.from_lexicon(tok, args.lexicon)
    bias = {**{(t,): 1.0 for t in anchors.positive}, **{(t,): -1.0 for t in anchors.negative}}
    processor = ak.hf.AnchorLogitsProcessor(ak.hf.logit_steerer(model, anchors, ak.SteerConfig(eta=0.06)))
    variants = {
        "unsteered": (contextlib.nullcontext, {}),
        "hidden hook": (lambda: ak.hf.steer(model, anchors, ak.SteerConfig()), {}),
        "logit form": (contextlib.nullcontext, {"logits_processor": transformers.LogitsProcessorList([processor])}),
        "sequence_bias": (contextlib.nullcontext, {"sequence_bias": bias}),
    }
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    rows = []
    for batch in args.batch:
        ids = tok([text] * batch, return_tensors="pt")
        speeds = {k: [] for k in variants}
        for rep in range(args.reps + 1):                      # rep 0 warms up
            for name, (context, kwargs) in variants.items():
                with context(), torch.no_grad():
                    start = time.perf_counter()
                    out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                         do_sample=False, pad_token_id=tok.eos_token_id, **kwargs)
                    dt = time.perf_counter() - start
                assert out.shape[1] - ids.input_ids.shape[1] == args.tokens
                if rep:
                    speeds[name].append(batch * args.tokens / dt)
        base = statistics.median(speeds["unsteered"])
        for name, v in speeds.items():
            tok_s = statistics.median(v)
            rows.append({"B": batch, "variant": name, "tok_s": tok_s, "overhead_pct": 100 * (base / tok_s - 1)})
            print(rows[-1], flush=True)
    meta = {"command": "make bench-hf", "transformers": transformers.__version__, "torch": torch.__version__,
            "model": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": 1, "tokens": args.tokens,
            "reps": args.reps, "lexicon": args.lexicon, "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "hf-cpu.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
