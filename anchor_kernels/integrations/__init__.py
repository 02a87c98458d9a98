"""Adapters that plug anchor steering into inference engines, one module per engine:

    hf         Hugging Face transformers: ``ak.hf.steer(model, anchors)`` (hidden form) and
               ``AnchorLogitsProcessor`` (logit form).
    vllm       vLLM v1: ``AnchorSteering``, a logits processor for both of vLLM's processor
               interfaces, per-request anchor sets, logit or exact hidden form.
    sglang     SGLang: ``AnchorSteeringSGLang``, a ``CustomLogitProcessor``.
    llama_cpp  llama.cpp through llama-cpp-python: a ``logits_processor`` built from a GGUF.
    serving    what the server adapters share: named anchor sets configured once per server,
               per-request arguments, and the LM head read from the checkpoint.

Each imports its engine lazily, so importing this package needs none of them.
"""
