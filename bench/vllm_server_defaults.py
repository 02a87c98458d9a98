"""Does a vLLM server's default steering degenerate? Every shipped lexicon as a set, with the
server's default step, in both forms, on chat prompts of the evaluation's sets.

    make bench-vllm-defaults     # the vLLM venv, on the default model (SmolLM2-135M-Instruct)

Per set and form: the mean repeated-4-gram rate of the answers (evaluation.repeated_ngram_rate),
how many answers steering made degenerate (rate >= 0.3, the same phrase over and over as in
"a n00b, a n00b", where the unsteered answer is below it), and how many differ from the unsteered
answer; the answer whose rate steering raised most is shown. Greedy, --tokens tokens, fp32.
Writes bench/results/vllm-server-defaults.{json,md} (the answers too).
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
DEGENERATE = 0.3
SETS = ("rude", "neutral", "harmful")


def run_form(model: str, form: str, prompts: list[str], tokens: int, scales) -> dict[str, list[str]]:
    import vllm

    from anchor_kernels.integrations import serving
    from anchor_kernels.integrations.vllm import AnchorSteering

    # The server's default (its sets and steps, gated) in this form; --scales adds each set again
    # at a multiple of its default step, as "name@scale".
    default = serving.ServingConfig.default()
    sets = {}
    served = serving.ServingConfig.from_dict({"form": form, "sets": default.sets})
    for name, spec in default.sets.items():
        step = served.set_step(name)
        for scale in scales:
            sets[name if scale == 1 else f"{name}@{scale:g}"] = {**spec, "step": step * scale}
    config = {"form": form, "sets": sets}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    os.environ[serving.CONFIG_ENV] = f.name
    llm = vllm.LLM(model=model, dtype="float32", max_model_len=512, max_num_seqs=len(prompts), seed=0,
                   logits_processors=[AnchorSteering])
    chats = [[{"role": "user", "content": p}] for p in prompts]
    answers = {}
    for name in (None, *sets):
        sp = vllm.SamplingParams(max_tokens=tokens, temperature=0.0,
                                 extra_args=None if name is None else {"anchor_set": name})
        out = llm.chat(chats, sp, use_tqdm=False)
        answers[name or "unsteered"] = [o.outputs[0].text for o in out]
    del llm
    os.unlink(f.name)
    return answers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local HF model folder (safetensors)")
    p.add_argument("--per-set", type=int, default=8, help="prompts from each of the rude, neutral and harmful sets")
    p.add_argument("--first", type=int, default=0, help="index of the first prompt taken from each set")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="multiples of each set's default step to run (1 = the default)")
    p.add_argument("--out", default="vllm-server-defaults", help="results name under bench/results")
    args = p.parse_args(argv)
    import vllm

    from anchor_kernels.evaluation import load_sets, repeated_ngram_rate
    from anchor_kernels.integrations.serving import ServingConfig

    prompts = [q for s in load_sets() if s.name in SETS for q in s.prompts[args.first: args.first + args.per_set]]
    rows, samples, all_answers = [], {}, {}
    for form in ("logits", "hidden"):
        answers = run_form(args.model, form, prompts, args.tokens, args.scales)
        served = ServingConfig.from_dict({"form": form, "sets": ServingConfig.default().sets})
        step = served.config
        base = [repeated_ngram_rate(t) for t in answers["unsteered"]]
        for name, texts in answers.items():
            rates = [repeated_ngram_rate(t) for t in texts]
            scale = float(name.split("@")[1]) if "@" in name else 1.0
            value = None if name == "unsteered" else served.set_step(name.split("@")[0]) * scale
            rows.append({"form": form, "set": name, "step": "" if value is None else
                         f"{'strength' if step.relative_step else 'eta'} {value:.4g}",
                         "margin": step.margin, "repeat4": statistics.mean(rates),
                         "degenerate": sum(r >= DEGENERATE for r in rates),
                         "made_degenerate": sum(r >= DEGENERATE > b for r, b in zip(rates, base)),
                         "changed": sum(a != b for a, b in zip(texts, answers["unsteered"])), "answers": len(texts)})
            print(rows[-1], flush=True)
            if name != "unsteered":
                i = max(range(len(texts)), key=lambda i: rates[i] - base[i])
                samples[f"{form}/{name}"] = {"prompt": prompts[i], "answer": texts[i], "repeat4": rates[i],
                                             "unsteered": answers["unsteered"][i], "unsteered_repeat4": base[i]}
        all_answers[form] = answers
    given = sys.argv[1:] if argv is None else list(argv)
    given = [a for i, a in enumerate(given) if a != "--model" and (i == 0 or given[i - 1] != "--model")]
    meta = {"command": "make bench-vllm-defaults" + (f" ARGS='{' '.join(given)}'" if given else ""), "vllm": vllm.__version__, "model": Path(args.model).name,
            "dtype": "float32", "tokens": args.tokens, "prompts": len(prompts), "sets": SETS,
            "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows, "most_raised": samples, "prompts": prompts,
                                                                "answers": all_answers}, indent=1))
    lines = [f"vLLM {meta['vllm']} server defaults (`{meta['command']}`, {meta['model']}, fp32, greedy, "
             f"{args.tokens} tokens, {len(prompts)} chat prompts: numbers {args.first}-{args.first + args.per_set - 1} "
             f"of the rude, neutral and harmful sets), {meta['date']}. Degenerate: repeated-4-gram rate >= "
             f"{DEGENERATE}.", "",
             "| form | set | default step | repeated 4-grams | degenerate | made degenerate | changed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['set']} | {r['step']} | {r['repeat4']:.3f} | {r['degenerate']}/{r['answers']} "
                     f"| {r['made_degenerate']} | {r['changed']}/{r['answers']} |")
    lines += ["", "Per form and set, the answer whose repeated-4-gram rate steering raised most (unsteered -> steered):", ""]
    for k, v in samples.items():
        lines.append(f"- {k} ({v['unsteered_repeat4']:.2f} -> {v['repeat4']:.2f}): {v['prompt']!r}\n"
                     f"  - unsteered: {v['unsteered'][:200]!r}\n  - steered: {v['answer'][:200]!r}")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
