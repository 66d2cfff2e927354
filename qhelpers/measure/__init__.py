"""Measurement: running texts through a (quantized) model and turning the outputs into
per-text numbers. May import ``quant`` and the layers below it.

- ``scoring``: per-text negative log-likelihood, token and byte counts, batched and windowed
  (``MeasureConfig``, ``Scorer``, ``protocol_measure``);
- ``sweep``: many variants over one corpus on one loaded model, giving one per-text table;
- ``sweep_cache``: an on-disk cache of sweep scores keyed by model, texts and settings;
- ``criticality``: per-layer criticality sweeps (protect one / quantize one layer);
- ``activations``: residual-stream capture (``iter_residual_batches`` over a whole list of
  texts, ``capture_residual`` for one batch) and the statistics computed on activations;
- ``weight_stats``: weight statistics per tensor, per component and per layer;
- ``divergence``: per-token ``KL(p_full || p_quant)`` of next-token distributions
  (``kl_divergence``, ``KLReference``).
"""
