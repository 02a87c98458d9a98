"""HF transformers generate, steered vs unsteered, side by side in one run, with the yardstick.

    make bench-hf       # the default model (SmolLM2-135M-Instruct, fp32), one torch thread

Variants alternate for --reps reps after a warm-up, every request decoding exactly --tokens tokens
(EOS suppressed by min_new_tokens); each reports its median time per decode step (timestamped by
a stopping criterion every variant carries) and the time spent inside the steering itself: unsteered; the hidden hook (``ak.hf.steer``,
``SteerConfig()``); the logit form (``AnchorLogitsProcessor``, ``SteerConfig(eta=0.06)``); and
``sequence_bias`` (transformers' built-in per-token bias, +-1 on the same set's anchors: the
cheapest thing that runs where the steering runs, the yardstick). Writes
bench/results/hf-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    # Time inside the steering itself, per call: the hook's steer_hidden and the processor's apply_.
    inside = []

    def timed(fn):
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside.append(time.perf_counter() - start)
        return call
    hf_module = sys.modules["anchor_kernels.integrations.hf"]
    hf_module.steer_hidden = timed(hf_module.steer_hidden)
    ak.LogitSteerer.apply_ = timed(ak.LogitSteerer.apply_)

    class StepClock(transformers.StoppingCriteria):
        """Timestamps every decoding step (in every variant, so it costs all of them the same)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    rows = []
    for batch in args.batch:
        ids = tok([text] * batch, return_tensors="pt")
        steps = {k: [] for k in variants}
        spent = {k: [] for k in variants}
        for rep in range(args.reps + 1):                      # rep 0 warms up
            for name, (context, kwargs) in variants.items():
                clock = StepClock()
                inside.clear()
                with context(), torch.no_grad():
                    out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                         do_sample=False, pad_token_id=tok.eos_token_id,
                                         stopping_criteria=transformers.StoppingCriteriaList([clock]), **kwargs)
                assert out.shape[1] - ids.input_ids.shape[1] == args.tokens
                if rep:   # decode steps only: the first interval follows the prompt's forward
                    steps[name] += [b - a for a, b in zip(clock.times, clock.times[1:])]
                    spent[name].append(sum(inside) / args.tokens)
        # Median step over every step of every rep: robust to a shared machine's slow spells.
        base = statistics.median(steps["unsteered"])
        for name in variants:
            step = statistics.median(steps[name])
            own = statistics.mean(spent[name])
            rows.append({"B": batch, "variant": name, "tok_s": batch / step, "overhead_pct": 100 * (step / base - 1),
                         "in_steering_ms": 1e3 * own, "in_steering_pct": 100 * own / base})
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
