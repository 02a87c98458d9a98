"""anchor_kernels: fused kernels for anchor-word steering of an LLM's last hidden state.

    import anchor_kernels as ak
    anchors = ak.AnchorSet(positive=[...], negative=[...])
    h_new = ak.steer_hidden(hidden, lm_head.weight, anchors, ak.SteerConfig(steps=10))
"""
from . import native
from .anchors import AnchorBank, AnchorSet, PreparedAnchors, anchor_gram, prepare_anchors
from .config import SteerConfig
from .steer import BACKENDS, resolve_backend, steer_hidden

__all__ = [
    "AnchorBank", "AnchorSet", "PreparedAnchors", "SteerConfig", "BACKENDS",
    "anchor_gram", "native", "prepare_anchors", "resolve_backend", "steer_hidden",
]
__version__ = "0.1.0"
