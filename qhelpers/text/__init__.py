"""Text: the languages and corpora measured, and the one path from texts to padded token
batches. May import ``stats`` and ``util``; ``models`` sits beside it at the same level.

- ``corpora``: language metadata (resource group, script, family), the packaged corpora
  (UDHR and the seeds' texts) and ``load_corpus``;
- ``calibration``: per-language calibration text for calibrated quantizers and importance
  matrices (machine-generated, never the evaluation text), ``calibration_texts("en" | lang | "mix")``;
- ``encoding``: token encoding and least-padding batches (``encode_corpus``,
  ``length_batches``, ``pad_batch``, ``iter_padded_batches``) used by every measurement and
  activation capture.
"""
