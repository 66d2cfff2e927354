"""The bottom layer: small utilities every other layer may use. It imports no other qhelpers
layer (third-party: tqdm for progress bars, torch for thread pinning).

- ``errors``: the error types (``QHelpersError`` and its subclasses ``ConfigError``,
  ``CorpusError``, ``ModelLoadError``, ``MeasurementError``, ``UnknownArchitectureError``);
- ``atomic``: atomic file writes (a reader sees the old file or the new one, never half);
- ``threads``: ``torch_threads``, pinning torch's CPU thread count for a block;
- ``cache``: where converted models, sweeps and adapter zoos are cached;
- ``progress``: ``progress_bar`` for long loops.
"""
