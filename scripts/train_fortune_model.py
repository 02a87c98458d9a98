"""Trains the embedded default model: a small Llama-architecture causal LM on Debian's
`fortunes` corpus, with a byte-level BPE tokenizer trained by the `tokenizers` library.

    apt-get install fortunes            # the corpus: /usr/share/games/fortunes
    python scripts/train_default_model.py --minutes 55

Seeded; on 2 CPU cores it trains for the given wall-clock budget, then reports held-out
perplexity and writes python_tests/fixtures/fortune/ (safetensors in bf16, tokenizer, config,
TRAINING.json with provenance and numbers).
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

CORPUS_DIR = Path("/usr/share/games/fortunes")
OUT = Path(__file__).resolve().parent.parent / "python_tests" / "fixtures" / "fortune"
EOS = "<|endoftext|>"


def read_fortunes(root: Path) -> list[str]:
    docs = []
    for path in sorted(root.iterdir()):
        if (path.suffix in (".dat", ".u8") or path.is_dir() or path.is_symlink()
                or path.name in ("art", "ascii-art")):  # pictures, not sentences
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        for chunk in text.split("\n%\n"):
            chunk = " ".join(chunk.split())
            if 20 <= len(chunk) <= 1000:
                docs.append(chunk)
    return docs


def train_tokenizer(docs, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=None)


def token_stream(tokenizer, docs):
    ids = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, stream, context, batch=32):
    model.eval()
    total, count = 0.0, 0
    windows = stream[: (len(stream) - 1) // context * context + 1]
    starts = list(range(0, len(windows) - 1 - context + 1, context))
    for i in range(0, len(starts), batch):
        x = torch.stack([windows[s: s + context] for s in starts[i: i + batch]])
        y = torch.stack([windows[s + 1: s + context + 1] for s in starts[i: i + batch]])
        logits = model(x).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=55.0)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import LlamaConfig, LlamaForCausalLM

    docs = read_fortunes(CORPUS_DIR)
    random.shuffle(docs)
    held_out = max(1, len(docs) // 20)
    train_docs, test_docs = docs[held_out:], docs[:held_out]
    tokenizer = train_tokenizer(train_docs, args.vocab)
    train, test = token_stream(tokenizer, train_docs), token_stream(tokenizer, test_docs)
    print(f"{len(docs)} fortunes, {len(train)} training tokens, {len(test)} held-out tokens", flush=True)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    budget = args.minutes * 60
    start = time.time()
    step = 0
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.context - 1, (args.batch,))
        x = torch.stack([train[s: s + args.context] for s in starts])
        y = torch.stack([train[s + 1: s + args.context + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        step += 1

    ppl = perplexity(model, test, args.context)
    print(f"held-out perplexity {ppl:.2f} after {step} steps", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "TRAINING.json").write_text(json.dumps({
        "command": f"python scripts/train_default_model.py --minutes {args.minutes} --seed {args.seed}",
        "corpus": "Debian package `fortunes` (1:1.99.1-7.3, /usr/share/games/fortunes): fortune "
                  "cookies, quotations and jokes; BSD-style licence (see /usr/share/doc/fortunes*/copyright)",
        "documents": len(docs), "held_out_documents": held_out,
        "train_tokens": len(train), "held_out_tokens": len(test),
        "parameters": params, "steps": step, "batch": args.batch, "context": args.context,
        "held_out_perplexity": round(ppl, 3), "minutes": args.minutes, "seed": args.seed,
        "machine": "2 CPU cores", "torch": torch.__version__,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
