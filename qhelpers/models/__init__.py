"""Models: finding the parts of a causal LM and loading one. May import ``stats`` and ``util``;
``text`` sits beside it at the same level and the two do not import each other.

- ``archs``: the architecture registry, one table from ``config.model_type`` to the module
  paths of layers, projections and norms (the only place that knows architectures);
- ``loaded``: ``LoadedModel``, a model with its tokenizer, architecture entry, device, dtype
  and origin (kept light: no loaders imported);
- ``loading``: ``load_model`` for hub ids, local folders, embedded GGUF models and tiny
  random models; device and dtype resolution;
- ``cache``: the stamp that lets a load skip re-hashing a converted model's unchanged files.
"""
