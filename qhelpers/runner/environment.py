"""What a notebook's kernel runs in: the Jupyter kernel check, the GPUs a worker may be given,
BLAS threads per worker and the kernel's environment variables.

Kernel environment: ``MPLBACKEND`` = the inline backend, ``PYTHONHASHSEED=0``, ``QHELPERS_PROFILE=<profile>``,
the repository root prepended to ``PYTHONPATH`` (so ``import qhelpers`` is this checkout), and
with ``--workers N`` on a machine with several GPUs, one GPU per worker slot through
``CUDA_VISIBLE_DEVICES``; several workers on the CPU share the cores (``OMP_NUM_THREADS`` and co.).
Kernels that write goldens run pinned instruction sets (:data:`PINNED_NUMERICS`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from qhelpers.runner.errors import RunnerError

REPO_ROOT = Path(__file__).resolve().parents[2]
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def check_kernel(name: str) -> None:
    """Raise RunnerError (with the install command) if Jupyter has no kernel ``name``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        ksm.get_kernel_spec(name)
    except NoSuchKernel:
        try:
            avail = ", ".join(sorted(ksm.find_kernel_specs())) or "none"
        except Exception:
            avail = "unknown"
        raise RunnerError(
            f"Jupyter kernel {name!r} not found (installed kernels: {avail}). Install it with:\n"
            f"  python -m ipykernel install --user --name {name}\n"
            f"or pass --kernel NAME for an installed one."
        ) from None


def visible_gpus(env: Mapping[str, str] | None = None, torch_count: int | None = -1) -> list[str]:
    """The GPU ids a worker may be given through CUDA_VISIBLE_DEVICES.

    ``torch.cuda.device_count()`` when torch imports (``torch_count=-1`` means ask torch), the
    entries of CUDA_VISIBLE_DEVICES naming those devices when it is set (so ``"2,3"`` stays
    ``["2", "3"]``), else ``0..n-1``; without torch, the entries of CUDA_VISIBLE_DEVICES."""
    env = os.environ if env is None else env
    raw = env.get("CUDA_VISIBLE_DEVICES")
    listed = [x.strip() for x in raw.split(",") if x.strip()] if raw is not None else None
    if listed is not None:
        # CUDA stops at the first invalid entry such as -1
        valid: list[str] = []
        for x in listed:
            if x.startswith("-"):
                break
            valid.append(x)
        listed = valid
    if torch_count == -1:
        try:
            import torch

            torch_count = int(torch.cuda.device_count())
        except Exception:
            torch_count = None
    if torch_count is None:
        return listed or []
    if listed is not None:
        return listed[:torch_count]
    return [str(i) for i in range(torch_count)]


def cpu_threads_per_worker(workers: int, cpu_count: int | None = None) -> int | None:
    """BLAS threads for each of ``workers`` notebooks running side by side on the CPU: the
    cores shared out (at least 1), or None for a single worker (the libraries' default).
    Oversubscribed threads (2 kernels x all cores) made linear algebra up to 10x slower."""
    if workers <= 1:
        return None
    return max(1, (cpu_count or os.cpu_count() or 1) // workers)


#: The code paths the regression goldens are computed with, the same on every x86-64 CPU with AVX2,
#: Intel's or AMD's: ATen's vectorized kernels (softmax, layer norm, exp, ...) and oneDNN at AVX2;
#: MKL's GEMM on its COMPATIBLE branch, the only conditional-numerical-reproducibility branch MKL
#: honours on non-Intel CPUs (on AMD it ignores "AVX2" and runs its AUTO branch: 19 golden cells
#: written on an Intel Xeon moved on CI's AMD EPYC, 2026-12-05, and tests pinning float bits failed);
#: numpy's dispatched loops at AVX2 (X86_V3) rather than AVX-512; OpenBLAS (numpy's and scipy's) with
#: its Haswell kernels rather than SkylakeX or Zen ones; no dynamic thread counts (MKL's
#: reproducibility conditions). COMPATIBLE GEMM is 3-4x slower than AVX2, so the pin is for the test
#: run and ``--write-goldens`` only (the suite itself runs the fast paths).
PINNED_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
}


def pinned_numerics_env(cpuinfo: str | None = None) -> dict[str, str]:
    """:data:`PINNED_NUMERICS` where this CPU can run them (x86-64 with AVX2 and FMA), else ``{}``
    (e.g. ARM: its goldens then hold only on the same kind of CPU). ``cpuinfo``: the text of
    /proc/cpuinfo (read when None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                cpuinfo = fh.read()
        except OSError:
            return {}
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return dict(PINNED_NUMERICS) if {"avx2", "fma"} <= set(flags) else {}


def kernel_env(profile: str, gpu: str | None, threads: int | None = None,
               pin_numerics: bool = False) -> dict[str, str]:
    """The environment of a notebook's worker and kernel: this process's, plus the settings above
    (``gpu``: the one CUDA device it sees; ``threads``: BLAS threads, unless the user set them;
    ``pin_numerics``: :func:`pinned_numerics_env`, as the goldens are written and checked with)."""
    env = dict(os.environ)
    if pin_numerics:
        env.update(pinned_numerics_env())
    if threads is not None:
        # not LIBGGUF_NUM_THREADS: libgguf's GGUF encoders start a thread per core and join them (no spin-wait);
        # two calls sharing 2 cores took as long as the two one after the other, and a fixed share would
        # leave cores idle once the other notebooks finish
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, str(threads))  # the user's own setting wins
    # figures inline in the executed notebooks, whatever the caller's MPLBACKEND
    env["MPLBACKEND"] = INLINE_BACKEND
    env["PYTHONHASHSEED"] = "0"
    env["QHELPERS_PROFILE"] = profile
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences ipykernel's debugger warning
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + old if old else "")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env
