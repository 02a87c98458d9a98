"""Loads the compiled extension (which registers ``torch.ops.anchor_kernels.steer_hidden``)
and gives the op its fake implementation, so it traces under torch.compile."""
from __future__ import annotations

import torch


def _check_torch_build() -> None:
    """A built extension is ABI-bound to the torch release it was compiled for (setup.py writes
    _build_info.py): loading it under another torch fails with undefined symbols or crashes."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # a source tree that was never built
        return
    built, running = (".".join(v.split("+")[0].split(".")[:2]) for v in (TORCH_VERSION, torch.__version__))
    if built != running:
        raise ImportError(
            f"anchor_kernels was built for torch {TORCH_VERSION} but torch {torch.__version__} is installed; "
            f"the compiled extension only runs with torch {built}.x. Install torch=={built}.* or rebuild "
            "anchor_kernels against this torch: pip install --no-build-isolation --force-reinstall "
            "--no-deps anchor_kernels")


_check_torch_build()

try:
    from . import _C  # noqa: F401  (importing registers the schema and the CPU/CUDA kernels)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # a source tree that was never built, or a broken build
    _C = None
    LOAD_ERROR = exc


def available() -> bool:
    return _C is not None


def cuda_built() -> bool:
    return _C is not None and bool(_C.cuda_built)


_device_problems: dict[int, str | None] = {}


def cuda_device_problem(index: int) -> str | None:
    """None if the built CUDA kernels run on GPU ``index``, else why not (e.g. no kernel image
    for its architecture). Asked once per device, then remembered."""
    if index not in _device_problems:
        _device_problems[index] = _C.cuda_check_device(index)
    return _device_problems[index]


def require() -> None:
    if _C is None:
        raise RuntimeError(
            "anchor_kernels._C is not built, so the 'cpu' and 'cuda' backends and the op schema "
            "are unavailable (the 'reference' backend still works). Build it with "
            f"`pip install --no-build-isolation -e .`. Import error: {LOAD_ERROR}")


def op_schema() -> str:
    """The op's argument list and return, as declared once in csrc/ops.cpp."""
    require()
    schema = str(torch.ops.anchor_kernels.steer_hidden.default._schema)
    return schema[schema.index("("):]


if _C is not None:

    def _check_devices(op: str, first: str, **tensors) -> None:
        # The Meta kernel is this fake impl: one meta tensor among CPU ones dispatches here, and
        # without this check the call would return uninitialised memory on the other device.
        device = tensors[first].device
        for name, t in tensors.items():
            torch._check(t is None or t.device == device,
                         lambda: f"{op}: {name} is on {t.device} but {first} is on {device}; all tensor "
                                 "arguments must be on one device")

    @torch.library.register_fake("anchor_kernels::steer_hidden")
    def _steer_hidden_fake(hidden, weight, bias, anchor_ids, anchor_weights, gram, row_sets,
                           step_size, steps, objective, reg, temperature, margin, max_norm,
                           relative_step, direction=None):
        _check_devices("steer_hidden", "hidden", hidden=hidden, weight=weight, bias=bias,
                       anchor_ids=anchor_ids, anchor_weights=anchor_weights, gram=gram,
                       row_sets=row_sets, step_size=step_size, direction=direction)
        torch._check(hidden.dim() == 2, lambda: "steer_hidden: hidden must be 2-D [B, d]")
        torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
                     lambda: "steer_hidden: weight must be [V, d] with hidden's d")
        return hidden.new_empty(hidden.shape)

    @torch.library.register_fake("anchor_kernels::steer_logits_")
    def _steer_logits_fake(logits, mixing, anchor_ids, anchor_weights, gram, row_sets, step_size,
                           hidden_norm, steps, objective, reg, temperature, margin, max_norm,
                           relative_step):
        _check_devices("steer_logits_", "logits", logits=logits, mixing=mixing, anchor_ids=anchor_ids,
                       anchor_weights=anchor_weights, gram=gram, row_sets=row_sets, step_size=step_size,
                       hidden_norm=hidden_norm)
        torch._check(logits.dim() == 2, lambda: "steer_logits_: logits must be 2-D [B, V]")
        return None

    from .autograd import register as _register_autograd

    _register_autograd("anchor_kernels::steer_hidden")
