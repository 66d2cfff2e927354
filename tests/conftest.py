"""Shared pytest fixtures and markers for qhelpers.

Fixtures here are session-scoped and shared by every test module: treat the models they
return as read-only (``copy.deepcopy(lm.model)`` before changing weights, or ask the
``tiny_model`` factory for ``fresh=True``).

Markers: ``slow`` (tests that take minutes, e.g. the Gemma-3 conversion); deselect with
``-m "not slow"``.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

from qhelpers.runner.environment import pinned_numerics_env
from qhelpers.util.cache import SWEEP_CACHE_ENV

# nbval's kernels inherit these: figures render inline exactly as in the goldens, and the kernels run
# the numeric code paths the goldens were written with (run_all.py --write-goldens does the same). Set
# before any test imports torch or numpy, the pin holds for this process too, so tests that pin exact
# float bits hold on any x86-64 CPU with AVX2, Intel's or AMD's.
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
os.environ.update(pinned_numerics_env())
# MKL's COMPATIBLE branch has no thread-count-independent (strict) mode, and ATen's parallel sums split
# by thread count: the tests that pin float bits pin them for 2 threads, as on CI's 2 cores
PINNED_TEST_THREADS = 2
# a fresh sweep cache for this test run (its nbval kernels inherit it): the goldens' shared sweeps are
# computed here, never read from one that an earlier run, code or numeric environment left in ~/.cache
os.environ[SWEEP_CACHE_ENV] = tempfile.mkdtemp(prefix="qhelpers-test-sweeps-")

import torch  # noqa: E402  (after the pinned environment, which torch reads when it loads)

torch.set_num_threads(PINNED_TEST_THREADS)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes minutes (embedded Gemma conversion, ...); deselect with -m 'not slow'"
    )


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: ``tiny_model("gpt2")`` -> a cached ``LoadedModel`` of ``tiny:gpt2`` on CPU.

    Extra keyword arguments go to :func:`qhelpers.models.loading.load_model` (``dtype``, ``seed``).
    ``fresh=True`` returns a new, uncached load that the test may modify.
    """
    from qhelpers.models.loading import load_model

    cache: dict[tuple, object] = {}

    def factory(arch: str, *, fresh: bool = False, **kwargs):
        kwargs.setdefault("device", "cpu")
        if fresh:
            return load_model(f"tiny:{arch}", **kwargs)
        key = (arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = load_model(f"tiny:{arch}", **kwargs)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def qhelpers_cache_dir() -> Path:
    """Folder of converted embedded models: the same one ``load_model`` uses by default
    (``$QHELPERS_CACHE``, else ``~/.cache/qhelpers/models``), so a conversion done by the
    tests also serves the README example and the notebooks (and vice versa)."""
    from qhelpers.models import loading as models

    return models.models_cache_root(None)


@pytest.fixture(scope="session")
def embedded_smollm(qhelpers_cache_dir: Path):
    """``embedded:smollm2-135m`` on CPU in float32 (converted once per cache, ~30 s).

    Skipped (with the install command) only where the package is absent and no converted
    cache exists, e.g. on a GPU machine without registry access.
    """
    from qhelpers.models import loading as models

    info = models.EMBEDDED_MODELS["smollm2-135m"]
    if models._package_dir(info["import_name"]) is None and models._read_cache_meta(
        models.embedded_cache_dir("smollm2-135m", qhelpers_cache_dir)
    ) is None:
        pytest.skip(f"{info['distribution']} is not installed and no converted cache exists: {info['pip_install']}")
    return models.load_model("embedded:smollm2-135m", device="cpu", dtype="fp32", cache_dir=qhelpers_cache_dir)


@pytest.fixture(scope="session")
def load_benchmark():
    """Factory: ``load_benchmark("sweep_benchmark")`` -> ``benchmarks/<name>.py`` loaded as a module
    (benchmarks/ holds scripts, not a package)."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
