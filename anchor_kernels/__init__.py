"""anchor_kernels: fused kernels for anchor-word steering of an LLM's last hidden state.

    import anchor_kernels as ak
    anchors = ak.AnchorSet(positive=[...], negative=[...])
    h_new = ak.steer_hidden(hidden, lm_head.weight, anchors, ak.SteerConfig(steps=10))
"""
from . import lexicons, native
from .anchors import AnchorBank, AnchorSet, PreparedAnchors, anchor_gram, prepare_anchors
from .config import SteerConfig
from .logits import LogitSteerer
from .steer import BACKENDS, resolve_backend, steer_hidden

__all__ = [
    "AnchorBank", "AnchorSet", "LogitSteerer", "PreparedAnchors", "SteerConfig", "BACKENDS",
    "anchor_gram", "lexicons", "native", "prepare_anchors", "resolve_backend", "steer_hidden",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "hf":  # imported on first use: transformers is optional
        from .integrations import hf

        return hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
