"""Quantization: what a weight becomes at b bits, which weights are quantized, and applying
that to a loaded model and undoing it bit-identically. May import ``models``, ``text``,
``stats`` and ``util``.

- ``quantizers``: pure functions on one tensor (INT2-8 symmetric/asymmetric per tensor,
  channel or group, clipping, NF4/FP4 bit-exact with bitsandbytes);
- ``methods``: the interface of every other backend (``WeightMethod``: per-tensor ``encode`` with
  the tensor's role, optional calibration in ``prepare``; storage bits per weight);
- ``gguf``: llama.cpp's GGML types and mixture presets (libgguf), with llama-quantize's rules;
- ``hqq``: Half-Quadratic Quantization (the ``hqq`` library);
- ``autoround``: AWQ and SignRound through ``auto-round`` (calibrated);
- ``imatrix``: llama-imatrix's importance matrices from calibration text;
- ``catalog``: every method by name and the spec strings notebooks take (``gguf:Q4_K_M``);
- ``bnb``: the real bitsandbytes path (load a model with NF4 / FP4 / INT8 weights);
- ``protection``: ``ProtectionSpec`` (what stays in full precision) resolved to a ``QuantPlan``;
- ``engine``: ``Variant`` and ``QuantEngine``, applying a variant in place and restoring it;
- ``prefix_cache``: reuse of decoder-layer inputs shared by variants of a sweep;
- ``strategies``: the seeds' configuration sets and selection rules, as data.
"""
