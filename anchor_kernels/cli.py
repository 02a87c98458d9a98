"""Command-line entry point: ``anchor-kernels`` / ``python -m anchor_kernels``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import AnchorSet, SteerConfig, generation, lexicons, steer_hidden
from .config import OBJECTIVES
from .steer import BACKENDS, unavailable_reason


def _probabilities(hidden, weight, anchors):
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    log_pos = torch.logsumexp(logp[:, list(anchors.positive)], dim=-1)
    log_neg = torch.logsumexp(logp[:, list(anchors.negative)], dim=-1)
    return log_pos, log_neg


def demo(args) -> int:
    """Steers the last hidden states of a randomly initialised LM head (no trained model yet)."""
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(args.vocab, args.dim, generator=g) / args.dim**0.5
    hidden = torch.randn(args.batch, args.dim, generator=g) * 4
    perm = torch.randperm(args.vocab, generator=g).tolist()
    anchors = AnchorSet(positive=perm[:8], negative=perm[8:16])
    config = SteerConfig(steps=args.steps, step_size=args.step_size, objective=args.objective,
                         max_norm=args.max_norm)
    print("anchor_kernels demo: a RANDOMLY INITIALISED LM head (V=%d, d=%d), %d hidden states, "
          "8 positive + 8 negative anchor tokens.\nThe trained embedded model arrives with the "
          "CLI's generate command; this shows the op itself.\n" % (args.vocab, args.dim, args.batch))
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


def _steer_args(p):
    p.add_argument("--model", type=Path, default=None, help="local HF model folder (default: the embedded model)")
    p.add_argument("--lexicon", default="positive_sentiment", help="anchor lexicon: " + ", ".join(lexicons.names()))
    p.add_argument("--positive", nargs="+", help="positive anchor words (instead of --lexicon)")
    p.add_argument("--negative", nargs="+", help="negative anchor words (instead of --lexicon)")
    p.add_argument("--steps", type=int, default=SteerConfig.steps)
    p.add_argument("--step-size", type=float, default=SteerConfig.step_size)
    p.add_argument("--objective", choices=OBJECTIVES, default=SteerConfig.objective)
    p.add_argument("--max-norm", type=float, default=None)
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling (top-k 40, T 0.8)")


def _prompts(args) -> list[str]:
    if getattr(args, "prompt", None):
        if not all(p.strip() for p in args.prompt):
            raise ValueError("--prompt: prompts must not be empty")
        return args.prompt
    path = args.prompts if getattr(args, "prompts", None) else generation.DEFAULT_PROMPTS
    if not Path(path).is_file():
        raise ValueError(f"--prompts: no such file {path}")
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return lines


def _setup(args):
    model, tokenizer = generation.load_model(args.model)
    anchors = generation.anchors_for(tokenizer, args.lexicon, args.positive, args.negative)
    config = SteerConfig(steps=args.steps, step_size=args.step_size, objective=args.objective,
                         max_norm=args.max_norm)
    return model, tokenizer, anchors, config


def cmd_generate(args) -> int:
    """Unsteered and steered continuations side by side."""
    model, tokenizer, anchors, config = _setup(args)
    prompts = _prompts(args)
    print(f"model {args.model or 'embedded default'}; {anchors.size} anchors ({len(anchors.positive)} positive, "
          f"{len(anchors.negative)} negative) from {'your words' if args.positive else 'lexicon ' + args.lexicon}; "
          f"{config}\n")
    common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, sample=not args.greedy)
    plain = generation.generate(model, tokenizer, prompts, **common)
    steered = generation.generate(model, tokenizer, prompts, anchors=anchors, config=config, backend=args.backend,
                                  **common)
    for prompt, a, b in zip(prompts, plain.texts, steered.texts):
        print(f"> {prompt}\n  unsteered: {prompt}{a}\n  steered:   {prompt}{b}\n")
    return 0


def cmd_gap(args) -> int:
    """The paper's analysis: the positive-minus-negative anchor logit gap at every step."""
    import csv

    model, tokenizer, anchors, config = _setup(args)
    prompts = _prompts(args)
    runs = {"model": generation.generate(model, tokenizer, prompts, args.max_new_tokens, args.seed, sample=not args.greedy)}
    if args.compare:
        other, other_tok = generation.load_model(args.compare)
        if other_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError("--compare: the two models must share a tokenizer for their anchor gaps to compare")
        runs["compare"] = generation.generate(other, other_tok, prompts, args.max_new_tokens, args.seed,
                                              sample=not args.greedy)
    if not args.no_steered:
        runs["steered"] = generation.generate(model, tokenizer, prompts, args.max_new_tokens, args.seed, anchors=anchors,
                                              config=config, backend=args.backend, sample=not args.greedy)
    gaps = {name: generation.mean_logit_gap(run.logits, anchors) for name, run in runs.items()}  # [B, steps]
    if args.csv.is_dir() or args.png.is_dir():
        raise ValueError(f"--csv/--png must be file paths, got a directory: {args.csv if args.csv.is_dir() else args.png}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "prompt", "step", "gap"])
        for name, g in gaps.items():
            for b in range(g.shape[0]):
                for t in range(g.shape[1]):
                    writer.writerow([name, b, t, f"{g[b, t].item():.5f}"])
    print(f"{'run':>10} {'mean gap':>9} {'first step':>11} {'last step':>10}")
    for name, g in gaps.items():
        print(f"{name:>10} {g.mean():9.3f} {g[:, 0].mean():11.3f} {g[:, -1].mean():10.3f}")
    _plot_gap(gaps, args.png)
    print(f"wrote {args.csv} and {args.png}")
    return 0


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


def _plot_gap(gaps, path: Path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in gaps.items():
        mean = g.mean(0)
        ax.plot(range(len(mean)), mean.tolist(), label=name)
        ax.fill_between(range(len(mean)), (mean - g.std(0)).tolist(), (mean + g.std(0)).tolist(), alpha=0.15)
    ax.set_xlabel("generation step")
    ax.set_ylabel("mean positive - mean negative anchor logit")
    ax.legend()
    _save(plt, fig, path)


def cmd_eval(args) -> int:
    """Steering at several strengths vs a logit_bias baseline: effect and fluency cost."""
    from tqdm import tqdm

    model, tokenizer, anchors, config = _setup(args)
    prompts = _prompts(args)
    negatives = generation.lexicon_negatives(None if args.positive else args.lexicon) if not args.negative else args.negative
    methods = [("unsteered", {})]
    methods += [(f"steer eta={s:g}", dict(anchors=anchors, config=SteerConfig(
        steps=config.steps, step_size=s, objective=config.objective, max_norm=config.max_norm), backend=args.backend))
        for s in args.strengths]
    methods += [(f"logit_bias b={b:g}", dict(anchors=anchors, logit_bias=b)) for b in args.biases]
    rows = []
    for name, kw in tqdm(methods, desc="eval", unit="method"):
        gen = generation.generate(model, tokenizer, prompts, args.max_new_tokens, args.seed, sample=not args.greedy, **kw)
        rows.append(dict(method=name, gap=generation.mean_logit_gap(gen.logits, anchors).mean().item(),
                         sentiment=generation.sentiment(gen.texts),
                         negative_rate=generation.negative_word_rate(gen.texts, negatives),
                         perplexity=generation.continuation_perplexity(model, tokenizer, prompts, gen)))
    print(f"\n{len(prompts)} prompts, {args.max_new_tokens} new tokens each, seed {args.seed}\n")
    print(f"{'method':>18} {'anchor gap':>11} {'sentiment':>10} {'neg words':>10} {'perplexity':>11}")
    for r in rows:
        print(f"{r['method']:>18} {r['gap']:11.3f} {r['sentiment']:10.3f} {r['negative_rate']:10.4f} {r['perplexity']:11.2f}")
    _plot_eval(rows, args.png)
    print(f"wrote {args.png}")
    return 0


def _plot_eval(rows, path: Path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(("sentiment", "gap"), axes):
        for family, marker in (("unsteered", "o"), ("steer", "s"), ("logit_bias", "^")):
            pts = [r for r in rows if r["method"].startswith(family)]
            ax.plot([r["perplexity"] for r in pts], [r[metric] for r in pts], marker=marker, label=family)
            for r in pts:
                ax.annotate(r["method"].split(" ")[-1], (r["perplexity"], r[metric]), fontsize=7)
        ax.set_xlabel("continuation perplexity under the unsteered model (fluency cost)")
        ax.set_ylabel({"sentiment": "VADER compound sentiment", "gap": "anchor logit gap"}[metric])
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anchor-kernels", description="Anchor-word steering of LLM generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="unsteered and steered continuations side by side")
    _steer_args(p)
    p.add_argument("--prompt", nargs="+", help="prompts (default: the shipped eval prompts)")
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    p.set_defaults(run=cmd_generate)
    p = sub.add_parser("gap", help="anchor logit gap per generation step (CSV + PNG)")
    _steer_args(p)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompts", type=Path)
    p.add_argument("--compare", type=Path, help="a second model folder (same tokenizer) to compare")
    p.add_argument("--no-steered", action="store_true", help="leave out the steered run")
    p.add_argument("--csv", type=Path, default=Path("gap.csv"))
    p.add_argument("--png", type=Path, default=Path("gap.png"))
    p.set_defaults(run=cmd_gap)
    p = sub.add_parser("eval", help="steering vs logit_bias: effect and fluency cost (table + PNG)")
    _steer_args(p)
    p.add_argument("--prompts", type=Path)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="step sizes")
    p.add_argument("--biases", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="logit_bias strengths")
    p.add_argument("--png", type=Path, default=Path("eval.png"))
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("demo", help="the op alone on a random LM head: the anchor gap before and after")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=SteerConfig.steps)
    p.add_argument("--step-size", type=float, default=SteerConfig.step_size)
    p.add_argument("--objective", choices=OBJECTIVES, default=SteerConfig.objective)
    p.add_argument("--max-norm", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"anchor-kernels: error: {exc}", file=sys.stderr)
        return 2
