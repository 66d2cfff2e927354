"""A stand-in converted-model folder shared by the model-cache and fault tests (test_model_cache.py,
test_faults.py): a tiny Llama saved where the embedded SmolLM2's conversion would be, with the
metadata (each file's size and sha256) that qhelpers verifies."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable


def fake_conversion(root: Path, tiny_model: Callable[[str], Any]) -> tuple[Path, Any]:
    """``root/smollm2-135m`` holding tiny:llama as a qhelpers conversion; returns the folder and the model."""
    folder = root / "smollm2-135m"
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in folder.iterdir()}
    meta = {"cache_format": 2, "name": "smollm2-135m", "source": "embedded", "files": files}
    (folder / "qhelpers_meta.json").write_text(json.dumps(meta))
    return folder, lm.model
