"""Decoding throughput of vLLM steered vs unsteered, both forms, side by side in one run.

    make bench-vllm     # the vLLM venv, on the default model (SmolLM2-135M-Instruct)
    .venv-vllm/bin/python bench/vllm_throughput.py --model DIR [--batch 1 8] [--tokens 64]

For each form one engine is built; unsteered, steered and logit_bias batches alternate (median of
--reps), every request decodes exactly --tokens tokens (ignore_eos). logit_bias is vLLM's built-in
per-request processor adding +-1 to the same set's anchor logits: the cheapest thing that can run
where the steering runs, the yardstick for its glue. Writes bench/results/vllm-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Tell me what you think of people who are bad at math."
FORMS = {
    "logits": {"form": "logits", "sets": {"harmless": {"lexicon": "harmless"}}},
    "hidden": {"form": "hidden", "sets": {"harmless": {"lexicon": "harmless"}}},
}


def run_form(model: str, form: str, batches, tokens: int, reps: int, dtype: str) -> list[dict]:
    import vllm

    from anchor_kernels.integrations import serving
    from anchor_kernels.integrations.vllm import AnchorSteering

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(FORMS[form], f)
    os.environ[serving.CONFIG_ENV] = f.name
    llm = vllm.LLM(model=model, dtype=dtype, max_model_len=512, max_num_seqs=max(batches), seed=0,
                   logits_processors=[AnchorSteering])
    anchors = serving.ServingConfig.from_env().bank(model).sets[0]
    bias = {**{t: 1.0 for t in anchors.positive}, **{t: -1.0 for t in anchors.negative}}
    kinds = {"unsteered": {}, "steered": {"extra_args": {"anchor_set": "harmless"}}, "logit_bias": {"logit_bias": bias}}
    rows = []
    for batch in batches:
        timings = {kind: [] for kind in kinds}
        for rep in range(reps + 1):                      # rep 0 warms up
            for kind in timings:
                sp = vllm.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, **kinds[kind])
                t0 = time.perf_counter()
                out = llm.generate([PROMPT] * batch, sp, use_tqdm=False)
                dt = time.perf_counter() - t0
                assert all(len(o.outputs[0].token_ids) == tokens for o in out)
                if rep:
                    timings[kind].append(batch * tokens / dt)
        un, st, lb = (statistics.median(timings[k]) for k in kinds)
        rows.append({"form": form, "B": batch, "tokens": tokens, "unsteered_tok_s": un, "steered_tok_s": st,
                     "overhead_pct": 100 * (un / st - 1), "logit_bias_tok_s": lb,
                     "logit_bias_overhead_pct": 100 * (un / lb - 1)})
        print(rows[-1], flush=True)
    del llm
    os.unlink(f.name)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local HF model folder (safetensors)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--forms", nargs="+", choices=sorted(FORMS), default=sorted(FORMS))
    args = p.parse_args(argv)
    import torch
    import vllm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for form in args.forms:
        rows += run_form(args.model, form, args.batch, args.tokens, args.reps, args.dtype)
    meta = {"command": "make bench-vllm", "vllm": vllm.__version__, "torch": torch.__version__, "device": device,
            "model": Path(args.model).name, "dtype": args.dtype, "cpus": os.cpu_count(), "reps": args.reps,
            "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vllm-{device}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
