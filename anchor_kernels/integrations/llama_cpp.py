"""llama.cpp through llama-cpp-python: anchor steering as a ``logits_processor``.

    from llama_cpp import Llama, LogitsProcessorList
    from anchor_kernels.integrations.llama_cpp import LlamaCppSteerer

    llm = Llama(model_path=GGUF, n_threads=1, embedding=True)   # embedding=True: see below
    steer = LlamaCppSteerer.from_gguf(GGUF, "harmless", ak.SteerConfig(), llama=llm)
    llm.create_completion(prompt, logits_processor=LogitsProcessorList([steer]))
    llm.create_chat_completion(messages, logits_processor=LogitsProcessorList([steer]))

llama-cpp-python calls the processor first, with ``llama_get_logits_ith(-1)`` (raw logits) as a
float32 array, which the steerer edits in place (the logit form: + M c); a strided view (what
llama-cpp-python 0.3 passes) or a read-only array is steered in a copy kept across tokens, which
is returned (valid until the next call). The LM head is the GGUF's
``output.weight``, or ``token_embd.weight`` for tied models, dequantised once with ``gguf``.
The relative step (``SteerConfig(strength=...)``, the default) and the trust region need
``||h0||``: with ``Llama(..., embedding=True)`` llama.cpp also returns the final-norm hidden
state, and passing that ``llama`` gives the exact hidden-state edit (W h' = W h0 + M c). Without
it, use METHOD.md's literal step, ``SteerConfig(eta=...)``.
Quantised heads steer the quantised model's logits; a greedy match with the HF model needs an
f32 GGUF (quantisation alone changes the unsteered tokens).
"""
from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import torch

from ..anchors import AnchorBank, AnchorSet
from ..config import SteerConfig
from ..logits import LogitSteerer

HEAD_NAMES = ("output.weight", "token_embd.weight")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_gguf_head(path) -> torch.Tensor:
    """The ``[V, d]`` LM head of a GGUF file: f32/f16/bf16 heads in their own dtype, quantised
    ones dequantised to fp32 (the only float type that holds scale x quant exactly)."""
    from gguf import GGMLQuantizationType as Q, GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    for name in HEAD_NAMES:
        if name in tensors:
            t = tensors[name]
            d, vocab = (int(x) for x in t.shape[:2])     # GGUF lists dims innermost first
            if t.tensor_type in (Q.F16, Q.BF16):
                raw = np.array(t.data).view(np.uint16).reshape(vocab, d)   # one copy out of the mmap
                return torch.from_numpy(raw).view(torch.float16 if t.tensor_type == Q.F16 else torch.bfloat16)
            rows = dequantize(np.asarray(t.data), t.tensor_type)
            # f32 tensors come back as read-only views of the memory-mapped file: copy those once.
            rows = np.require(rows, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
            return torch.from_numpy(rows.reshape(vocab, d))
    raise ValueError(f"{path}: no LM head ({' or '.join(HEAD_NAMES)}) in this GGUF file")


def gguf_tokenizer(path):
    """The HF tokenizer stored in a GGUF file (for ``AnchorSet.from_words`` / lexicons)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


class LlamaCppSteerer:
    """A llama-cpp-python ``logits_processor`` that steers every call (one request per Llama, one
    anchor set). Like the Llama it serves, not for use from several threads at once."""

    def __init__(self, head: torch.Tensor, anchors, config: SteerConfig | None = None, llama=None,
                 mixing_dtype: torch.dtype | None = None):
        # It passes hidden_norm whenever it has llama, and refuses such a config without it (below).
        self.steerer = LogitSteerer(head, anchors, config, with_hidden_norm=True, mixing_dtype=mixing_dtype)
        config = self.steerer.config
        self.llama = llama
        self._buffer = None
        if llama is not None and not getattr(getattr(llama, "context_params", None), "embeddings", False):
            raise ValueError("llama must be built with Llama(..., embedding=True): its hidden state gives "
                             "||h0|| for the relative step and the trust region")
        if (config.relative_step or config.max_norm is not None) and llama is None:
            raise ValueError("the relative step (SteerConfig strength=, the default) and max_norm need ||h0||: "
                             "pass llama=Llama(..., embedding=True), or use SteerConfig(eta=...) (METHOD.md's "
                             "literal step) without max_norm")
        if llama is not None and llama.n_vocab() != head.shape[0]:
            raise ValueError(f"llama has a vocabulary of {llama.n_vocab()} but the head has {head.shape[0]} rows")
        if self.steerer.num_sets != 1:
            raise ValueError(f"anchors hold {self.steerer.num_sets} sets, but a llama.cpp steerer serves one request "
                             "with one set: pass an AnchorSet (or one steerer per set)")
        # The per-token path runs right after llama.cpp's forward has evicted the caches, where
        # every Python step costs several times its warm price (bench/llama_cpp_throughput.py): so
        # the op's arguments, checked here once, are built once and the op is called directly.
        self._op = None
        if self.steerer.backend == "cpu":
            s = self.steerer
            self._norm = torch.zeros(1)
            self._op = torch.ops.anchor_kernels.steer_logits_.default
            self._op_args = (s.mixing, *s.prepared.tensors, torch.zeros(1, dtype=torch.long),
                             torch.full((1,), config.step_size, dtype=torch.float32),
                             self._norm if llama is not None else None, config.steps, config.objective,
                             float(config.reg), float(config.temperature), config.margin_value,
                             config.max_norm_value, config.relative_step)

    @classmethod
    def from_gguf(cls, path, anchors, config: SteerConfig | None = None, llama=None,
                  mixing_dtype: torch.dtype | None = None) -> "LlamaCppSteerer":
        """``anchors``: an AnchorSet/AnchorBank, or the name of a shipped lexicon (resolved with
        the GGUF's tokenizer). ``mixing_dtype``: of M (LogitSteerer's; None: the head's dtype where
        it is 16-bit, else fp32). A quantised head (Q8_0, Q4_K, ...) is dequantised to fp32, so M
        is fp32 and the edit holds METHOD.md's fp32 tolerance; ``torch.bfloat16`` halves the bytes
        each steered token reads, at the 16-bit tolerance (bf16 rounds M to 2^-9 relative, finer
        than such a head's own quantisation; on SmolLM2's Q8_0 head the edit moved by <= 1.5%)."""
        if isinstance(anchors, str):
            anchors = AnchorSet.from_lexicon(gguf_tokenizer(path), anchors)
        if not isinstance(anchors, (AnchorSet, AnchorBank)):
            raise TypeError(f"anchors must be an AnchorSet, an AnchorBank or a lexicon name, got {type(anchors).__name__}")
        return cls(read_gguf_head(path), anchors, config, llama, mixing_dtype=mixing_dtype)

    def _hidden_norm_value(self) -> float:
        import llama_cpp

        ptr = llama_cpp.llama_get_embeddings_ith(self.llama.ctx, -1)
        if not ptr:
            raise RuntimeError("llama.cpp returned no hidden state for the last token (embedding=True?)")
        h = np.ctypeslib.as_array(ptr, shape=(self.llama.n_embd(),))
        sq = float(h.dot(h))   # fp32: one pass, no copy; fp64 only where that leaves fp32's range
        return math.sqrt(sq) if 1e-30 < sq < 1e38 else float(np.linalg.norm(h.astype(np.float64)))

    def __call__(self, input_ids, scores):
        if not isinstance(scores, np.ndarray) or scores.dtype != np.float32 or scores.ndim != 1:
            raise TypeError("scores must be llama-cpp-python's float32 [n_vocab] logits array")
        if scores.shape[0] != self.steerer.vocab:
            raise ValueError(f"scores has {scores.shape[0]} entries but the head has V = {self.steerer.vocab}")
        norm = self._hidden_norm_value() if self.llama is not None else None
        if norm is not None and not 0.0 <= norm <= FLOAT32_MAX:
            raise ValueError(f"llama.cpp's hidden state for this token has norm {norm} (not finite in float32): "
                             "cannot steer from it")
        if not (scores.flags.writeable and scores.flags.c_contiguous):
            # llama-cpp-python 0.3 hands a strided view (the logit field of its candidates), and a
            # read-only map must not be written: steer a copy in a buffer kept across tokens (it
            # copies what a processor returns back into its candidates).
            if self._buffer is None:
                self._buffer = np.empty(scores.shape, np.float32)
                self._buffer_rows = torch.from_numpy(self._buffer).view(1, -1)
            np.copyto(self._buffer, scores)
            scores, rows = self._buffer, self._buffer_rows
        else:
            rows = torch.from_numpy(scores).view(1, -1)
        if self._op is None:
            self.steerer.apply_(rows, hidden_norm=None if norm is None else torch.tensor([norm]))
            return scores
        if norm is not None:
            self._norm.numpy()[0] = norm
        with torch.no_grad():
            self._op(rows, *self._op_args)
        return scores
