"""End-to-end decoding: tokens/s steered vs unsteered, and the overhead in percent.

    python bench/e2e_decode.py            # GPU: random Llama shaped like 1B and 8B, bf16, B{1,8,64}, T{1,10}
    python bench/e2e_decode.py --quick    # a tiny model on CPU (what CI runs)

Loops: "generate" is HF generate under ak.hf.steer; "static-compiled" is generate with a static
KV cache and the forward compiled by torch.compile (mode="reduce-overhead": CUDA graphs on a
GPU), the op inside the captured graph; "literal" is HF generate with the literal baseline
(full-vocabulary logits + autograd each step) in the same hook, for contrast. The peak memory
of one steered forward is compared with an unsteered one (GPU). Writes
bench/results/e2e-<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import anchor_kernels as ak

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (64, 128, 2, 4, 2, 4096),
}


def make_model(shape: str, dtype, device):
    import transformers

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                      max_position_embeddings=4096, pad_token_id=0, eos_token_id=None)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.eval()


@contextlib.contextmanager
def literal_hook(model, anchors, config):
    from baselines import literal_autograd

    head = model.get_output_embeddings()

    def hook(module, args):
        h = args[0]
        last = literal_autograd(h[:, -1], module.weight, anchors, config)
        return (torch.cat([h[:, :-1], last.unsqueeze(1)], dim=1),)

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def tokens_per_s(model, ids, new_tokens, device, **kw) -> float:
    def run():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (and compile)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return ids.shape[0] * new_tokens / sorted(times)[1]  # median of 3


def peak_bytes(model, ids, device, ctx) -> int | None:
    if device.type != "cuda":
        return None
    with torch.no_grad(), ctx():
        model(ids)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ["tiny"] if args.quick else ["llama-1b", "llama-8b"]
    batches, steps = ((1, 4), (1, 10)) if args.quick else ((1, 8, 64), (1, 10))
    loops = ["generate"] if args.quick else ["generate", "static-compiled"]
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        model = make_model(shape, dtype, device)
        vocab = model.config.vocab_size
        anchors = ak.AnchorSet(list(range(100, 132)), list(range(200, 232)))
        prepared = ak.prepare_anchors(model.get_output_embeddings().weight, anchors)
        for B in batches:
            ids = torch.randint(3, vocab, (B, 16), device=device)
            for T in steps:
                config = ak.SteerConfig(steps=T)
                for loop in loops:
                    kw = {}
                    if loop == "static-compiled":
                        kw = dict(cache_implementation="static")
                        model.forward = torch.compile(model.forward, mode="reduce-overhead")
                    plain = tokens_per_s(model, ids, new_tokens, device, **kw)
                    with ak.hf.steer(model, prepared, config):
                        steered = tokens_per_s(model, ids, new_tokens, device, **kw)
                    row = dict(model=shape, loop=loop, B=B, T=T, unsteered_tok_s=plain, steered_tok_s=steered,
                               overhead_pct=100 * (plain / steered - 1))
                    if loop == "generate" and (args.quick or B == 1):
                        with literal_hook(model, anchors, config):
                            literal = tokens_per_s(model, ids, new_tokens, device)
                        row.update(literal_tok_s=literal, literal_overhead_pct=100 * (plain / literal - 1))
                    if loop == "static-compiled":
                        model.forward = model.forward._torchdynamo_orig_callable
                    row["peak_bytes_unsteered"] = peak_bytes(model, ids, device, contextlib.nullcontext)
                    row["peak_bytes_steered"] = peak_bytes(model, ids, device,
                                                           lambda: ak.hf.steer(model, prepared, config))
                    rows.append(row)
                    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del model
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                dtype=str(dtype), new_tokens=new_tokens,
                command="python bench/e2e_decode.py" + (" --quick" if args.quick else ""))
    out = args.out or RESULTS / f"e2e-{device.type}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
