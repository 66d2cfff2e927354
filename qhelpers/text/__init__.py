"""Text: the languages and corpora measured, and the one path from texts to padded token
batches. May import ``stats`` and ``util``; ``models`` sits beside it at the same level.

- ``corpora``: language metadata (resource group, script, family), the packaged corpora
  (UDHR and the seeds' texts) and ``load_corpus``;
- ``encoding``: token encoding and least-padding batches (``encode_corpus``,
  ``length_batches``, ``pad_batch``, ``iter_padded_batches``) used by every measurement and
  activation capture.
"""
