"""Warm kernels: a notebook's kernel is started, and its slow first steps done, before the notebook runs.

Each notebook runs in a fresh kernel, so that no state passes from one notebook to the next. A fresh
kernel pays, before any work: its start, the imports of torch, transformers and qhelpers,
transformers' lazy imports on the first ``from_pretrained``, and on a GPU the CUDA context
(measured on 2 CPU cores: ~5 s outside the cells and ~7 s of setup cells per notebook). The worker
(:mod:`qhelpers.runner.worker`) therefore starts the kernel itself (:func:`start_warm_kernel`) and
executes in it, silently (no execution count, no output in the notebook),
:func:`qhelpers.models.warmup.warm_kernel`: the notebook's own imports (:func:`notebook_imports`),
one load of its model that is thrown away, a CUDA context. Then it hands the kernel to papermill.
The warm-up lives in :mod:`qhelpers.models` because it runs in the kernel; the runner's own
processes import no numeric stack. With ``run_all.py --start-ahead N`` (default 1) the supervisor
starts the workers of the next N queued notebooks while the running ones work, so that this cost
overlaps with their work."""
from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Any


def notebook_imports(path: str | Path) -> list[list[Any]]:
    """``[[module, [names]], ...]``: the modules a notebook's code cells import at their top level,
    in order, each once (``import a.b`` gives ``["a.b", []]``, ``from a import b, c`` gives
    ``["a", ["b", "c"]]``; relative imports are left out). Lines of IPython magics and shell
    escapes are ignored; a cell that still does not parse is skipped."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    found: dict[str, list[str]] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        try:
            tree = ast.parse("\n".join(lines))
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.setdefault(alias.name, [])
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = found.setdefault(node.module, [])
                names.extend(a.name for a in node.names if a.name != "*" and a.name not in names)
    return [[module, names] for module, names in found.items()]


def warm_up_code(imports: list[list[Any]], model: str | None, device: str | None, dtype: str | None) -> str:
    """The one statement the worker executes silently in a new kernel: a call of
    :func:`qhelpers.models.warmup.warm_kernel` that binds no name in the kernel's namespace."""
    args = json.dumps({"imports": imports, "model": model, "device": device, "dtype": dtype})
    return f"__import__('qhelpers.models.warmup', fromlist=['warm_kernel']).warm_kernel(**__import__('json').loads({args!r}))"


# ---------------------------------------------------------------------------- the worker's side


def start_warm_kernel(kernel_name: str, cwd: str, code: str, timeout: float) -> tuple[Any, dict[str, Any]]:
    """Start a kernel in ``cwd`` as papermill would (same kernel spec, this process's environment)
    and execute ``code`` in it silently. Returns the kernel manager, to hand to papermill
    (``execute_notebook(..., km=km)``; the caller shuts it down), and what happened:
    ``kernel_s`` (start until ready), ``warm_s`` and, when the warm-up raised, ``error``.

    Raises whatever prevents the kernel from starting (the caller then lets papermill start one)."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    t0 = time.perf_counter()
    km = AsyncKernelManager(kernel_name=kernel_name)
    run_sync(km.start_kernel)(cwd=cwd)
    info: dict[str, Any] = {}
    try:
        kc = km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=timeout)
            info["kernel_s"] = round(time.perf_counter() - t0, 3)
            t1 = time.perf_counter()
            msg_id = kc.execute(code, silent=True, store_history=False, allow_stdin=False,
                                user_expressions={"warm": LAST_RESULT})
            while True:
                reply = kc.get_shell_msg(timeout=None)
                if reply.get("parent_header", {}).get("msg_id") == msg_id:
                    break
            info["warm_s"] = round(time.perf_counter() - t1, 3)
            content = reply.get("content", {})
            if content.get("status") != "ok":
                info["error"] = f"{content.get('ename')}: {content.get('evalue')}"
            else:
                info.update(_steps(content.get("user_expressions", {}).get("warm", {})))
        finally:
            kc.stop_channels()
    except BaseException:
        shutdown_kernel(km)
        raise
    return km, info


#: The expression that reads :data:`qhelpers.models.warmup.LAST` back (a JSON string).
LAST_RESULT = "__import__('qhelpers.models.warmup', fromlist=['LAST']).LAST"


def _steps(expression: dict[str, Any]) -> dict[str, Any]:
    """``{"steps": {...seconds}, "step_errors": {...}}`` from the user expression's reply (empty
    when it could not be read)."""
    try:
        text = expression["data"]["text/plain"]
        result = json.loads(ast.literal_eval(text))
    except (KeyError, TypeError, ValueError, SyntaxError):
        return {}
    out: dict[str, Any] = {"steps": result.get("times", {})}
    if result.get("errors"):
        out["step_errors"] = result["errors"]
    return out


def kernel_alive(km: Any) -> bool:
    """Whether the kernel of ``km`` (from :func:`start_warm_kernel`) is still running."""
    from jupyter_core.utils import run_sync

    try:
        return bool(run_sync(km.is_alive)())
    except Exception:  # noqa: BLE001 - a manager that cannot say has no usable kernel
        return False


def shutdown_kernel(km: Any) -> None:
    """Shut a kernel from :func:`start_warm_kernel` down (at once; best effort)."""
    from jupyter_core.utils import run_sync

    try:
        if kernel_alive(km):
            run_sync(km.shutdown_kernel)(now=True)
    except Exception:  # noqa: BLE001 - the worker kills its descendants after this anyway
        pass
