"""Seed 001: can an adapter's language be read from its LoRA weights? One study in four
modules; each imports only modules listed before it (and nothing from other experiments).

- ``zoo``: LoRA adapters, training a "zoo" of them (one class = one language) and loading it;
- ``batched``: many small networks trained at once as stacked parameter tensors;
- ``features``: representations of the weight matrices (hand-crafted, pair coupling and
  learned autoencoder codes), vectorised over the adapters;
- ``classify``: MLP classifiers over repeated stratified splits, the per-matrix ranking and
  the ablation study.
"""
