"""vLLM: per-request anchor steering as a vLLM logits processor.

    vllm serve MODEL --logits-processors anchor_kernels.integrations.vllm:AnchorSteering
    LLM(model=MODEL, logits_processors=[AnchorSteering])
    SamplingParams(extra_args={"anchor_set": "harmless", "anchor_step_size": 0.05})

(Installed with pip, the class is also registered in vLLM's ``vllm.logits_processors``
entry-point group, which vLLM loads by itself.) The sets are the server's, see serving.py.
``anchor_step_size`` replaces the server config's step in that config's form: METHOD.md's literal
eta in the logit form (the config's ``"eta"``), and in the hidden form whichever the config names
(``"strength"``, the relative step, by default; or ``"eta"``).

``AnchorSteering`` implements both of vLLM's processor interfaces: V1
(``vllm.v1.sample.logits_processor``: ``update_state``/``apply(logits)``, the V1 model runner,
which the CPU build runs) and Model Runner V2 (``vllm.v1.worker.gpu.sample.logits_processor``:
``add_request``/``apply(logits, ctx)``, the default on GPUs), over one per-slot ``RowTable``.
Per step: one fused launch over the whole batch and no host sync; host work only when requests
join, leave or move.

Two forms:
  "logits" (default): the logit-space form on the raw logits (one [S, K, V] mixing matrix built
      from the checkpoint's LM head). vLLM applies allowed-token masks, bad words and the built-in
      logit_bias / min_tokens processors before custom ones, and model soft-capping inside the
      model, so those change what this form sees.
  "hidden": the exact METHOD.md edit of the LM-head input. The processor registers an
      out-of-tree replacement of vLLM's ``LogitsProcessor`` layer (``PluggableLayer.register_oot``)
      in the worker, before the model is built, that edits ``hidden_states`` with
      ``steer_hidden``. V1 model runner only (``VLLM_USE_V2_MODEL_RUNNER=0`` on GPUs), no
      prompt_logprobs for steered requests.

Tensor parallelism (``tensor_parallel_size > 1``): both forms. The LM-head input is replicated on
every rank while the head is split by vocabulary, so each rank reads the anchor rows (hidden form)
or the whole head (logit form, to build M) from the checkpoint once, and computes the same edit
as every other rank: no communication per step.
"""
from __future__ import annotations

import logging
import weakref

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor as _V1
from vllm.v1.sample.logits_processor.interface import MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2

from .serving import RequestSteering, ServingConfig, has_lm_head_bias, read_lm_head

logger = logging.getLogger(__name__)


class RowTable:
    """Which anchor set and step size each slot of a persistent batch uses (-1: none), on the
    host and mirrored on the device; ``flush()`` copies only after a change."""

    def __init__(self, capacity: int, device: torch.device, pin_memory: bool = False):
        device = torch.device(device)
        on_host = device.type == "cpu"
        pin = pin_memory and not on_host
        self.sets_host = torch.full((capacity,), -1, dtype=torch.long, pin_memory=pin)
        self.steps_host = torch.zeros(capacity, dtype=torch.float32, pin_memory=pin)
        self.sets = self.sets_host if on_host else self.sets_host.to(device)
        self.steps = self.steps_host if on_host else self.steps_host.to(device)
        self.steered = 0          # slots with a set
        self.batch_size = 0
        self._dirty = False

    @property
    def capacity(self) -> int:
        return self.sets_host.shape[0]

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < self.capacity:
            raise IndexError(f"slot {slot} is outside the table of {self.capacity}")
        return slot

    def assign(self, slot: int, steering: RequestSteering | None) -> None:
        slot = self._slot(slot)
        was = int(self.sets_host[slot]) >= 0
        if steering is None:
            self.sets_host[slot], self.steps_host[slot] = -1, 0.0
        else:
            self.sets_host[slot], self.steps_host[slot] = steering.set_index, steering.step_size
        self.steered += (steering is not None) - was
        self._dirty = True

    def move(self, src: int, dst: int) -> None:
        """``dst`` takes ``src``'s request; ``src`` is left empty."""
        src, dst = self._slot(src), self._slot(dst)
        if src == dst:
            return
        s = int(self.sets_host[src])
        self.assign(dst, None if s < 0 else RequestSteering(s, float(self.steps_host[src])))
        self.assign(src, None)

    def swap(self, a: int, b: int) -> None:
        a, b = self._slot(a), self._slot(b)
        for t in (self.sets_host, self.steps_host):
            t[a], t[b] = t[b].clone(), t[a].clone()
        self._dirty = True

    def any_steered(self, slots) -> bool:
        return bool((self.sets_host[torch.as_tensor(slots, dtype=torch.long)] >= 0).any())

    def flush(self) -> None:
        if self._dirty and self.sets is not self.sets_host:
            self.sets.copy_(self.sets_host, non_blocking=True)
            self.steps.copy_(self.steps_host, non_blocking=True)
        self._dirty = False


_TP_BIAS = ("anchor_kernels: the hidden form with tensor parallelism reads the anchor rows from the "
            "checkpoint, and this model's LM head adds a bias it does not read; use \"form\": \"logits\"")

# The hidden-form processor of the engine being built in this (worker) process: the logits layer
# binds to it when the model is built, right after the processors.
_HIDDEN: weakref.ReferenceType | None = None
# Live processors, so a second instance for the same engine (entry point + --logits-processors)
# stays inert instead of steering twice.
_LIVE: weakref.WeakSet = weakref.WeakSet()


class AnchorSteering(_V1, _V2):
    """vLLM logits processor: steers each request with the anchor set named in its
    ``extra_args`` (``anchor_set``, optional ``anchor_step_size`` in the server config's step form:
    literal eta or relative strength, see the module docstring); others are untouched."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Runs at request admission: a bad request fails alone (HTTP 400 on the server)."""
        serving = ServingConfig.from_env()
        steering = serving.request(getattr(sampling_params, "extra_args", None))
        if steering is not None and serving.form == "hidden" and getattr(sampling_params, "prompt_logprobs", None):
            raise ValueError("prompt_logprobs are not steered by the hidden form; drop them or 'anchor_set'")

    def __init__(self, vllm_config, device_or_states, is_pin_memory: bool | None = None):
        self.vllm_config = vllm_config
        self.serving = ServingConfig.from_env()
        if is_pin_memory is None:          # Model Runner V2: (vllm_config, req_states)
            self.v2 = True
            device, capacity, pin = device_or_states.device, device_or_states.max_num_reqs, False
        else:                              # V1: (vllm_config, device, is_pin_memory)
            self.v2 = False
            device, capacity, pin = device_or_states, vllm_config.scheduler_config.max_num_seqs, is_pin_memory
        self.device = torch.device(device)
        self.table = RowTable(capacity, self.device, pin)
        self.inert = any(p.vllm_config is vllm_config for p in _LIVE)
        if self.inert:
            logger.warning("anchor_kernels: AnchorSteering is already active for this engine "
                           "(entry point and --logits-processors); this instance does nothing")
        _LIVE.add(self)
        self._steerer = None
        self._prepared = None
        self._checkpoint_anchors = None
        self._layer_calls = 0
        self._checked_calls = 0
        self._anchor_bank = None
        if not self.inert:
            # Resolved now, against the model's vocabulary: a bad word or id fails the engine's
            # start, not its first steered request.
            model_config = vllm_config.model_config
            self._anchor_bank = self.serving.bank(model_config.tokenizer, vocab=model_config.get_vocab_size())
            global _HIDDEN   # this engine's layer binds to the hidden-form processor, or to none
            _HIDDEN = None
            if self.serving.form == "hidden":
                self._install_hidden_form()

    # ---- shared
    def _bank(self):
        return self._anchor_bank

    def _logit_steerer(self):
        if self._steerer is None:
            from ..logits import LogitSteerer

            head = read_lm_head(self.vllm_config.model_config.model).to(self.device)
            self._steerer = LogitSteerer(head, self._bank(), self.serving.config)
        return self._steerer

    def _admit(self, slot: int, params) -> bool:
        steering = self.serving.request(getattr(params, "extra_args", None))
        self.table.assign(slot, steering)
        return steering is not None and not self.inert

    def is_argmax_invariant(self) -> bool:
        return False

    # ---- V1 interface
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for slot in batch_update.removed:
            self.table.assign(slot, None)
        for slot, params, _, _ in batch_update.added:
            self._admit(slot, params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.table.swap(a, b)
            else:
                self.table.move(a, b)
        self.table.batch_size = batch_update.batch_size
        self.table.flush()

    # ---- Model Runner V2 interface
    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self._admit(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self.table.flush()

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.inert:
            return logits
        if ctx is None:   # V1: rows are the persistent batch's slots
            if self.table.steered == 0:
                return logits
            if logits.shape[0] != self.table.batch_size:
                raise RuntimeError(f"anchor_kernels: {logits.shape[0]} logits rows for a batch of "
                                   f"{self.table.batch_size} requests")
            if self.serving.form == "hidden":  # only V1 runs it (refused on V2 at construction)
                # The edit happened in the logits layer; make sure it did.
                if self._layer_calls == self._checked_calls:
                    raise RuntimeError("anchor_kernels: the hidden form's logits layer did not run; the "
                                       "model was built without it (see anchor_kernels.integrations.vllm)")
                self._checked_calls = self._layer_calls
                return logits
            rows = slice(0, logits.shape[0])
        else:             # V2: rows map to slots through the context
            if not self.table.any_steered(ctx.idx_mapping_np):
                return logits
            rows = ctx.expanded_idx_mapping
        self._logit_steerer().apply_(logits, row_sets=self.table.sets[rows], step_size=self.table.steps[rows])
        return logits

    # ---- the hidden form
    def _install_hidden_form(self) -> None:
        global _HIDDEN
        if self.v2:
            raise ValueError("anchor_kernels: the hidden form runs on vLLM's V1 model runner; set "
                             "VLLM_USE_V2_MODEL_RUNNER=0 or use \"form\": \"logits\"")
        if self.vllm_config.parallel_config.tensor_parallel_size > 1:
            # Read now: a checkpoint without a readable head, or with a bias, fails the engine's
            # start, not its first steered step (inside the model's forward, fatal to the engine).
            from ..anchors import compact_bank

            model = self.vllm_config.model_config.model
            if has_lm_head_bias(model):
                raise ValueError(_TP_BIAS)
            ids, bank = compact_bank(self._bank())
            self._checkpoint_anchors = (read_lm_head(model)[ids], bank)
        register_steered_logits_layer()
        _HIDDEN = weakref.ref(self)

    def steer_hidden_rows(self, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """Called by the logits layer with the LM-head input of this step's batch."""
        if self.table.steered == 0:
            return hidden
        rows = hidden.shape[0]
        if hidden.dim() != 2 or rows != self.table.batch_size:
            raise RuntimeError(f"anchor_kernels: the logits layer got {tuple(hidden.shape)} for a batch "
                               f"of {self.table.batch_size} requests (speculative decoding and "
                               "prompt_logprobs are not supported by the hidden form)")
        from ..steer import steer_hidden

        if self._prepared is None or self._prepared[0] is not weight:
            self._prepared = (weight, *self._hidden_anchors(weight))
        _, anchor_weight, prepared = self._prepared
        if anchor_weight is not weight and bias is not None:  # a bias the check at start did not see
            raise RuntimeError(_TP_BIAS)
        self._layer_calls += 1
        return steer_hidden(hidden, anchor_weight, prepared, self.serving.config, bias=bias,
                            row_sets=self.table.sets[:rows], step_size=self.table.steps[:rows])

    def _hidden_anchors(self, weight: torch.Tensor):
        """The weight the edit reads and the anchors packed for it: the layer's own LM head on one
        rank; with tensor parallelism, whose ranks hold a vocabulary slice each, the anchor rows
        read from the checkpoint (in the layer's dtype), the same on every rank."""
        from ..anchors import prepare_anchors

        if self._checkpoint_anchors is None:
            return weight, prepare_anchors(weight, self._bank())
        rows, bank = self._checkpoint_anchors
        rows = rows.to(device=weight.device, dtype=weight.dtype).contiguous()
        return rows, prepare_anchors(rows, bank)


def register_steered_logits_layer() -> None:
    """Makes vLLM build its ``LogitsProcessor`` layer as ``SteeredLogitsLayer`` (idempotent;
    must run before the model is built: ``AnchorSteering`` does it in its constructor)."""
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.logits_processor import LogitsProcessor as Layer

    current = op_registry_oot.get("LogitsProcessor")
    if current is not None and getattr(current, "anchor_kernels", False):
        return
    if current is not None:
        raise ValueError(f"vLLM's LogitsProcessor layer is already replaced by {current.__name__}; "
                         "the hidden form cannot wrap it")

    class SteeredLogitsLayer(Layer):
        anchor_kernels = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.anchor_processor = _HIDDEN

        def forward(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False):
            proc = self.anchor_processor() if self.anchor_processor is not None else None
            if proc is not None and not self.logits_as_input:
                hidden_states = proc.steer_hidden_rows(hidden_states, lm_head.weight, embedding_bias)
            return super().forward(lm_head, hidden_states, embedding_bias, skip_gather)

    Layer.register_oot(SteeredLogitsLayer, name="LogitsProcessor")
