"""SGLang: the logit form as a ``CustomLogitProcessor``.

    # server: the sets (and, because SGLang does not tell processors the model, the checkpoint)
    export ANCHOR_KERNELS_SERVING_CONFIG=steering.json     # {"model": "/ckpt", "sets": {...}}
    python -m sglang.launch_server --model-path /ckpt --enable-custom-logit-processor
    # client
    from anchor_kernels.integrations.sglang import AnchorSteeringSGLang
    sampling_params = {"custom_params": AnchorSteeringSGLang.params("harmless", step_size=0.06)}
    requests.post(url + "/generate", json={"text": prompt, "sampling_params": sampling_params,
                                           "custom_logit_processor": AnchorSteeringSGLang.to_str()})

SGLang calls the processor with the logits rows of the requests that named it and their
``custom_params``; rows whose params name no set are left alone. It offers no admission hook,
so ``params()`` checks the arguments on the client against the same config, and a bad value
that reaches the server raises a ValueError naming the argument.
"""
from __future__ import annotations

import torch

from .serving import ServingConfig, read_lm_head

try:  # SGLang needs CUDA; the class works (and is tested) without it
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor as _Base
except ImportError:
    _Base = object

# One steerer per (config, device): SGLang makes a new processor object per batch.
_STEERERS: dict = {}


def _steerer(serving: ServingConfig, device: torch.device):
    key = (id(serving), device)
    if key not in _STEERERS:
        from ..logits import LogitSteerer

        if serving.model is None:
            raise ValueError("the serving config needs \"model\" (the checkpoint folder) for SGLang, "
                             "whose processors are not told the model")
        if serving.form != "logits":
            raise ValueError("SGLang runs the logit form only (\"form\": \"logits\")")
        head = read_lm_head(serving.model).to(device)
        _STEERERS.clear()   # the config changed: drop the old mixing matrices
        bank = serving.bank(serving.model, vocab=head.shape[0])
        _STEERERS[key] = (serving, LogitSteerer(head, bank, serving.config))
    return _STEERERS[key][1]


class AnchorSteeringSGLang(_Base):
    """Per-request anchor steering of raw logits for SGLang (see the module docstring)."""

    @staticmethod
    def params(anchor_set: str, step_size: float | None = None) -> dict:
        """The request's ``custom_params``, checked against the server's config. ``step_size``
        (sent as ``anchor_step_size``) is METHOD.md's literal eta: SGLang runs the logit form,
        whose config names its step ``"eta"``; None keeps the config's."""
        args = {"anchor_set": anchor_set, **({} if step_size is None else {"anchor_step_size": step_size})}
        ServingConfig.from_env().request(args)
        return args

    def __call__(self, logits: torch.Tensor, custom_param_list=None) -> torch.Tensor:
        if not custom_param_list:
            return logits
        if len(custom_param_list) != logits.shape[0]:
            raise ValueError(f"custom_param_list has {len(custom_param_list)} entries for {logits.shape[0]} logits rows")
        serving = ServingConfig.from_env()
        asked = [serving.request({k: v for k, v in (p or {}).items() if k != "__req__"}) for p in custom_param_list]
        if all(a is None for a in asked):
            return logits
        sets = [-1 if a is None else a.set_index for a in asked]
        steps = [0.0 if a is None else a.step_size for a in asked]
        return _steerer(serving, logits.device).apply_(logits, row_sets=sets, step_size=steps)

    if _Base is object:
        @classmethod
        def to_str(cls) -> str:
            raise RuntimeError("to_str needs SGLang (pip install sglang): it serialises the class with "
                               "SGLang's own format")
