"""Command-line entry point: ``anchor-kernels`` / ``python -m anchor_kernels``."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import AnchorSet, SteerConfig, steer_hidden
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anchor-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="steer a random LM head's hidden states and print the anchor gap")
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
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"anchor-kernels: error: {exc}", file=sys.stderr)
        return 2
