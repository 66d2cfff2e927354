"""The warm-up of a notebook's kernel, run inside the kernel before the notebook (see
:mod:`qhelpers.runner.warm`, which starts the kernel and executes :func:`warm_kernel` in it).

It leaves nothing a notebook could see: it binds no name in the kernel's namespace, restores the
random number generators (Python's, NumPy's, torch's CPU and CUDA ones), and empties the "warn once"
registries of :mod:`warnings` and of transformers' ``warning_once``/``info_once``, so that a warning
the notebook would have printed is still printed. A step that fails is skipped (the notebook meets
the same error itself, in its own cell)."""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import sys
import time
import warnings
from typing import Any

#: What the last :func:`warm_kernel` of this process returned, as JSON (the worker reads it back
#: through the execute request's ``user_expressions``, which binds no name either).
LAST = "{}"

#: Top-level packages whose import marks a notebook that uses the numeric stack (and loads a model).
HEAVY = ("qhelpers", "torch", "transformers")

#: Modules worth importing ahead for such a notebook, whatever it imports (transformers' lazy imports of a
#: first load).
ALWAYS_IMPORTED = ("torch", "transformers", "transformers.modeling_utils", "transformers.cache_utils")


def warm_kernel(imports: list[list[Any]], model: str | None = None, device: str | None = None,
                dtype: str | None = None) -> dict[str, Any]:
    """Inside a kernel, before its notebook: import ``imports``; when the notebook uses the numeric
    stack (it imports qhelpers, torch or transformers: :data:`HEAVY`), also :data:`ALWAYS_IMPORTED`, a
    load of ``model`` on ``device`` that is thrown away, and the CUDA context when the device is a
    GPU. Then restore the random generators and empty the warn-once registries. Returns the seconds
    of each step done and the errors of the steps that failed."""
    times: dict[str, Any] = {}
    errors: dict[str, str] = {}
    t0 = time.perf_counter()
    heavy = any(str(module).split(".")[0] in HEAVY for module, _ in imports)
    torch = None
    if heavy or "torch" in sys.modules:  # a generator that exists already, or will, is restored
        try:
            import torch
        except ImportError:
            pass
    py_state = random.getstate()
    numpy = sys.modules.get("numpy")
    np_state = numpy.random.get_state() if numpy is not None else None
    cuda = (heavy and torch is not None and (device is None or str(device).startswith(("cuda", "auto")))
            and torch.cuda.is_available())
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with (torch.random.fork_rng(devices=devices) if torch is not None else contextlib.nullcontext()):
        for module, names in [[m, []] for m in (ALWAYS_IMPORTED if heavy else ())] + list(imports):
            try:
                _import(module, names)
            except BaseException as exc:  # noqa: BLE001 - the notebook meets the same error in its own cell
                errors[f"import {module}"] = f"{type(exc).__name__}: {exc}"
        times["imports_s"] = time.perf_counter() - t0
        if heavy and model and torch is not None:
            t1 = time.perf_counter()
            try:
                _load_and_drop(model, device, dtype)
            except BaseException as exc:  # noqa: BLE001
                errors["model"] = f"{type(exc).__name__}: {exc}"
            times["model_s"] = time.perf_counter() - t1
        if cuda:
            t2 = time.perf_counter()
            try:
                a = torch.ones(64, 64, device="cuda")
                (a @ a).sum().item()  # the CUDA context and a cuBLAS handle
                del a
            except BaseException as exc:  # noqa: BLE001
                errors["cuda"] = f"{type(exc).__name__}: {exc}"
            times["cuda_s"] = time.perf_counter() - t2
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    random.setstate(py_state)
    if np_state is not None:
        numpy.random.set_state(np_state)
    reset_warn_once()
    times["total_s"] = time.perf_counter() - t0
    global LAST
    result = {"times": {k: round(v, 3) for k, v in times.items()}, "errors": errors}
    LAST = json.dumps(result)
    return result


def reset_warn_once() -> None:
    """Forget which warnings were already shown: every module's ``__warningregistry__``, the
    ``"once"`` registry of :mod:`warnings`, and transformers' ``warning_once``/``info_once`` caches."""
    for module in list(sys.modules.values()):
        registry = getattr(module, "__warningregistry__", None)
        if isinstance(registry, dict):
            registry.clear()
    warnings.onceregistry.clear()
    tf_logging = sys.modules.get("transformers.utils.logging")
    for name in ("warning_once", "info_once"):
        # transformers' own, and whatever now sits on logging.Logger (a library may replace it)
        for owner in (tf_logging, logging.Logger):
            clear = getattr(getattr(owner, name, None), "cache_clear", None)
            if clear is not None:
                clear()


def _import(module: str, names: list[str]) -> None:
    import importlib

    mod = importlib.import_module(module)
    for name in names:
        if not hasattr(mod, name):  # a submodule that ``from module import name`` would import
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                pass


def _load_and_drop(model: str, device: str | None, dtype: str | None) -> None:
    from qhelpers.models.loading import load_model

    loaded = load_model(model, device=None if device in (None, "auto") else device, dtype=dtype)
    del loaded
