"""Import cost: importing qhelpers' modules (what a notebook's import cell does) must not import the
heavy libraries only some code paths need. Each is imported inside the function that uses it, so a
notebook pays for transformers when it loads a model and for hqq / auto-round / libgguf / bitsandbytes
only when it runs that method (transformers alone costs 3-5 s on 2 cores, hqq pulls in torch._dynamo).

Checked in a fresh interpreter: ``sys.modules`` after the imports."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

#: Libraries no module of qhelpers imports at module level.
LAZY = (
    "transformers",
    "accelerate",
    "safetensors",
    "hqq",
    "auto_round",
    "libgguf",
    "gguf",
    "bitsandbytes",
    "peft",
    "datasets",
    "sklearn",
    "torch._dynamo",
    "torch._inductor",
    "ray",
    "papermill",
)


def _imported_after(code: str) -> set[str]:
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps(sorted(m for m in sys.modules if m in {list(LAZY)!r} or m.split(".")[0] in {list(LAZY)!r})))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_package_import_is_free():
    """``import qhelpers`` imports no numeric library at all (the runner relies on it)."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, qhelpers; print(sorted({'torch', 'numpy', 'pandas'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert out.stdout.strip() == "[]"


def test_every_module_imports_without_the_heavy_libraries():
    """Every qhelpers module (so every notebook's import cell) imported in one interpreter."""
    found = _imported_after(
        """
        import importlib, pkgutil
        import qhelpers
        for info in pkgutil.walk_packages(qhelpers.__path__, "qhelpers."):
            importlib.import_module(info.name)
        """
    )
    assert found == set(), f"imported at module level by some qhelpers module: {sorted(found)}"


@pytest.mark.slow
def test_loading_a_model_imports_transformers_but_no_quantizer():
    """load_model brings transformers in (it needs it), but not the quantization libraries."""
    found = _imported_after(
        """
        from qhelpers.models.loading import load_model
        load_model("tiny:llama", device="cpu")
        """
    )
    assert "transformers" in found  # the probe itself sees imports
    unexpected = found & {"auto_round", "libgguf", "bitsandbytes", "peft", "datasets", "sklearn", "ray", "papermill"}
    assert unexpected == set(), sorted(unexpected)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
