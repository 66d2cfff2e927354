"""SignRound, AWQ and auto-round's RTN through Intel's ``auto-round`` (0.16.1), as calibrated
model-level methods.

:class:`AutoRoundMethod` runs ``auto_round.AutoRound`` once per engine (``prepare``) on a deep copy
of the model, with calibration text of the chosen language, and reads back the
fake-quantized weight auto-round leaves in each ``nn.Linear`` / GPT-2 ``Conv1D`` of the decoder
blocks; the loaded model is never touched (the engine swaps the returned tensors in and out).

What auto-round does here (read from its source and checked on the tiny models):

* Scheme ``W4A16``-style weight-only integer quantization, symmetric, one fp16 scale per group of
  ``group_size`` input weights of an output channel; only the linear layers inside decoder
  blocks (not ``lm_head``, not the embeddings).
* ``signround``: SignRound (signed-gradient descent on the rounding offsets and min/max
  scales, ``iters`` steps per block, block output loss); ``rtn``: auto-round's RTN, below 8 bits
  its default "optimized RTN" (a per-group scale search weighted by the calibration activations'
  importance matrix), plain RTN at 8 bits; ``awq``: AWQ smoothing (per-input-channel scales ``s``
  from activation and weight magnitudes, 20-point grid search on the block output, no clipping:
  auto-round's defaults) followed by plain RTN.
* AWQ folds ``s`` into the model: each *balance* layer's weight columns are multiplied by
  ``s`` before quantizing, and the preceding *smooth* op is divided by ``s`` (an RMSNorm /
  LayerNorm weight, or the trailing output rows of ``v_proj`` / ``up_proj``). The engine only
  swaps the quantized tensors, keeping the original norms, so this module returns the
  equivalent weights in the original basis: ``Q(W diag(s)) diag(1/s)`` (times ``s`` on the
  rows a smooth linear layer had divided), exactly the weight AWQ's own grid search scores
  (``w_qdq / scales``). The model then computes the function of auto-round's AWQ model, up to
  float32 rounding. auto-round has no AWQ mapping for GPT-2 (its ``Conv1D`` layout would also be
  scaled along the wrong axis): asking for AWQ on such a model raises a ConfigError.
* Calibration: ``n_samples`` windows of ``seqlen`` tokens cut from the calibration texts joined by
  blank lines (the tokenizer's leading special tokens, e.g. Gemma's BOS, start each window),
  spread evenly over the text, handed to auto-round as token tensors (a list of strings would be
  truncated at ``seqlen`` and dropped when shorter).
* Reproducibility: ``seed`` is auto-round's seed; ``amp=False`` so CPUs with bf16 support do not
  switch to bf16; no ``torch.compile``; no disk offload (``low_cpu_mem_usage=False``, which would
  write under ``./ar_work_space``). Deterministic on CPU (the tests compare two runs bit for bit). The global random
  state auto-round reseeds is restored afterwards.
* Device: ``device="model"`` (the default) runs auto-round's block-wise search where the model's
  parameters are (its ``device_map``): on the CPU for a CPU model, bit for bit the ``"cpu"`` run;
  on the GPU for a GPU model. ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` pick one; ``$QHELPERS_AUTOROUND_DEVICE``
  sets the default. On a GPU the results follow that device's floating-point rounding, not the CPU's;
  ``tests/test_autoround.py`` compares them with auto-round called directly on the same device
  (``-m gpu``, passed on an H100). Times per device: ``benchmarks/autoround_benchmark.py`` and
  ``benchmarks/README.md``.

Storage (``storage_bits``): auto-round's own export format (``format="auto_round"``, GPTQ-style
packing, no ``g_idx``): codes packed at ``bits`` each (``qweight`` int32), one fp16 scale and one
``bits``-wide zero point per group (``scales``, ``qzeros``): ``bits + (16 + bits) / group_size``
bits per weight, e.g. 4.15625 at 4 bits, groups of 128 (a partial last group counts as a group).
The weights returned are that checkpoint's: the integer codes of auto-round's fake-quantized weight
times the fp16 scales, the same tensors as auto-round leaves in memory except for its RTN, which
keeps fp32 scales there. A layer auto-round leaves unquantized is counted at 16 bits (it ships in
fp16) and a warning names it.

Excluded elements (protection masks): calibration sees the whole model; the engine then keeps the
protected elements' original values.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
import numbers
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from qhelpers.quant.methods import DenseEncoded, TensorRole, WeightMethod
from qhelpers.text.encoding import tokenize
from qhelpers.util.errors import ConfigError

__all__ = ["AUTOROUND_ALGORITHMS", "AUTOROUND_BITS", "DEVICE_ENV", "AutoRoundMethod", "calibration_windows", "run_autoround"]

#: Algorithms offered, as auto-round names them (``alg_configs``).
AUTOROUND_ALGORITHMS: tuple[str, ...] = ("signround", "awq", "rtn")

#: Integer weight widths auto-round's export kernels pack.
AUTOROUND_BITS: tuple[int, ...] = (2, 3, 4, 8)

#: Environment variable giving :class:`AutoRoundMethod`'s default ``device`` (``model`` when unset).
DEVICE_ENV = "QHELPERS_AUTOROUND_DEVICE"
_DEVICE = re.compile(r"cpu|model|cuda(:\d+)?")


def _int_field(obj: Any, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        object.__setattr__(obj, name, value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"AutoRoundMethod {name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class AutoRoundMethod(WeightMethod):
    """auto-round's ``algorithm`` (``signround``, ``awq``, ``rtn``) at ``bits`` with groups of
    ``group_size``, calibrated on ``n_samples`` windows of ``seqlen`` tokens of the calibration
    set ``calibration`` (:func:`qhelpers.text.calibration.calibration_texts`: ``"en"``, another
    language code, ``"mix"``). ``iters``: SignRound steps per block (ignored by ``awq`` and
    ``rtn``, and left out of their label). ``seed``: auto-round's seed. ``device``: where auto-round
    computes, ``"model"`` (the model's device; the default, or ``$QHELPERS_AUTOROUND_DEVICE``), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"`` (see the module docstring).

    The default budget, 32 windows of 128 tokens (4,096 tokens, the same for every language), fits
    the shipped text of each seed language with both embedded models' tokenizers (the smallest,
    Arabic with Gemma-3's, has 7,761 tokens; English about 8,100); Gemma-3 tokenizes the shipped
    Bengali and Hindi into fewer than 4,000 tokens, so those need a smaller budget."""

    algorithm: str = "signround"
    bits: int = 4
    group_size: int = 128
    iters: int = 200
    calibration: str = "en"
    n_samples: int = 32
    seqlen: int = 128
    seed: int = 0
    device: str = field(default_factory=lambda: os.environ.get(DEVICE_ENV, "model"))

    needs_calibration = True

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device.strip()):
            raise ConfigError(f"AutoRoundMethod device must be 'cpu', 'model' (the model's device), 'cuda' or 'cuda:N', "
                              f"got {self.device!r}" + (f" (from ${DEVICE_ENV})" if os.environ.get(DEVICE_ENV) == self.device
                                                        else ""))
        object.__setattr__(self, "device", self.device.strip())
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"AutoRoundMethod device {self.device!r}, but CUDA is not available here; use 'cpu' or "
                              "'model'")
        if self.algorithm not in AUTOROUND_ALGORITHMS:
            raise ConfigError(f"unknown auto-round algorithm {self.algorithm!r}; choose one of {list(AUTOROUND_ALGORITHMS)}")
        _int_field(self, "bits", 2)
        if self.bits not in AUTOROUND_BITS:
            raise ConfigError(f"auto-round bits must be one of {list(AUTOROUND_BITS)}, got {self.bits}")
        _int_field(self, "group_size", 8)
        _int_field(self, "iters", 1 if self.algorithm == "signround" else 0)
        _int_field(self, "n_samples", 1)
        _int_field(self, "seqlen", 8)
        _int_field(self, "seed", 0)
        from qhelpers.text.calibration import available_calibration_languages

        valid = (*available_calibration_languages(), "mix")
        if self.calibration not in valid:
            raise ConfigError(f"{self.algorithm} needs calibration text: calibration must be one of "
                              f"{', '.join(valid)}; got {self.calibration!r}")

    @property
    def label(self) -> str:
        label = f"{self.algorithm}{self.bits}-g{self.group_size}"
        if self.algorithm == "signround":
            label += f"-i{self.iters}"
        return f"{label}-{self.calibration}"

    def prepare(self, model: nn.Module, roles: Mapping[str, TensorRole], tokenizer: Any = None) -> dict[str, DenseEncoded]:
        """Run auto-round on a copy of ``model``: {parameter name: its quantized weight}."""
        if tokenizer is None:
            raise ConfigError(f"{self.label} calibrates on text and needs the model's tokenizer: give QuantEngine "
                              "the LoadedModel (load_model(...)), not the bare module")
        from qhelpers.text.calibration import calibration_texts

        texts = calibration_texts(self.calibration, tokenizer=tokenizer)
        return run_autoround(model, tokenizer, texts, algorithm=self.algorithm, bits=self.bits,
                             group_size=self.group_size, iters=self.iters, n_samples=self.n_samples,
                             seqlen=self.seqlen, seed=self.seed, device=self.device)

    def encode(self, weight: torch.Tensor, role: TensorRole, exclude: torch.Tensor | None,
               prepared: Mapping[str, DenseEncoded]) -> DenseEncoded:
        entry = prepared.get(role.name)
        if entry is None:
            raise ConfigError(f"auto-round quantizes only the linear layers inside decoder blocks; {role.name} is not "
                              "one of them: use scope='linear', or protect it")
        if entry.weight.shape != weight.shape:
            raise ConfigError(f"auto-round returned shape {tuple(entry.weight.shape)} for {role.name}, "
                              f"expected {tuple(weight.shape)}")
        return DenseEncoded(entry.weight.to(device=weight.device, dtype=weight.dtype), entry.bits)


# ----------------------------------------------------------------------------- calibration


def calibration_windows(tokenizer: Any, texts: Sequence[str], n_samples: int, seqlen: int) -> list[torch.Tensor]:
    """``n_samples`` token windows (``[1, seqlen]`` each) cut from ``texts`` joined by blank lines,
    non-overlapping and spread evenly over the text; each starts with the special tokens the
    tokenizer puts before a text (e.g. a BOS), if any."""
    if not texts:
        raise ConfigError("no calibration text: a calibrated method needs a non-empty calibration set")
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    prefix = list(full[: full.index(plain[0])]) if plain and plain[0] in full else []
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.extend(separator)
        ids.extend(tokenize(tokenizer, text, add_special_tokens=False)["input_ids"])
    body = seqlen - len(prefix)
    n_windows = len(ids) // body if body > 0 else 0
    if n_windows < n_samples:
        raise ConfigError(f"the calibration text has {len(ids)} tokens: {n_samples} windows of {seqlen} tokens need "
                          f"{n_samples * body}; lower n_samples or seqlen, or use a larger calibration set")
    starts = [(i * n_windows // n_samples) * body for i in range(n_samples)]
    return [torch.tensor([prefix + ids[s : s + body]], dtype=torch.long) for s in starts]


# ----------------------------------------------------------------------------- running auto-round


@contextlib.contextmanager
def _isolated_run() -> Iterator[None]:
    """Restore the global random state auto-round reseeds, keep its INFO logging quiet, and freeze
    the objects alive before the run out of the garbage collector's sight: auto-round calls
    ``gc.collect()`` about 3 times per block, each a full pass over the process's heap (0.33 s with
    torch, transformers and a loaded model on an H100 host: 35 of an AWQ calibration's 57 s there).

    The freeze happens even where a caller froze objects before (the H100 host's Python starts
    with 375 frozen): CPython cannot thaw part of the frozen set, so the run ends with
    ``gc.unfreeze()`` and the caller's objects are tracked again. Leaving everything frozen instead
    would keep the garbage of every object alive before the run (a deleted model's cycles) from ever
    being collected."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    ar_logger = logging.getLogger("autoround")
    level = ar_logger.level
    ar_logger.setLevel(logging.WARNING)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        ar_logger.setLevel(level)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextlib.contextmanager
def _recording_awq_scales() -> Iterator[list[tuple[nn.Module, list[nn.Module], torch.Tensor]]]:
    """Record each AWQ scale auto-round folds into the model, as (smooth op, balance layers, s).

    auto-round keeps no record of them once folded; its ``AWQTransform._apply_scales`` (the one
    place they are applied) is wrapped for the duration of the run (private API of auto-round
    0.16.1, hence the exact pin)."""
    from auto_round.algorithms.transforms.awq.base import AWQTransform

    records: list[tuple[nn.Module, list[nn.Module], torch.Tensor]] = []
    original = AWQTransform._apply_scales

    def recording(self: Any, mapping: Any, scales: torch.Tensor) -> None:
        records.append((mapping.smooth_layer, list(mapping.balance_layers), scales.detach().float().cpu().clone()))
        original(self, mapping, scales)

    AWQTransform._apply_scales = recording
    try:
        yield records
    finally:
        AWQTransform._apply_scales = original


#: torch's per-module hook tables (torch 2.13)
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _drop_hooks(model: nn.Module) -> None:
    """Remove the hooks a deep copy inherits: the engine's swap-in hooks of a variant applied while
    this method prepares would otherwise put that variant's weights into the calibration copy."""
    for module in model.modules():
        for table in _HOOK_TABLES:
            hooks = getattr(module, table, None)
            if hooks:
                hooks.clear()


def autoround_kwargs(algorithm: str, bits: int, group_size: int, iters: int, n_samples: int, seqlen: int,
                     seed: int, device: str = "cpu") -> dict[str, Any]:
    """Keyword arguments of ``auto_round.AutoRound`` for these settings (reproducible; on ``device``).

    ``"cuda:N"`` goes to auto-round as the index ``N``: it reads a ``"key:value"`` string as a map
    from layer names to devices (and warns that no layer is named ``cuda``)."""
    device_map: str | int = int(device.split(":")[1]) if device.startswith("cuda:") else device
    kwargs: dict[str, Any] = dict(alg_configs=algorithm, bits=bits, group_size=group_size, nsamples=n_samples,
                                  seqlen=seqlen, seed=seed, device_map=device_map, amp=False, low_cpu_mem_usage=False,
                                  enable_torch_compile=False)
    if algorithm == "signround":
        kwargs["iters"] = iters
    return kwargs


def run_autoround(model: nn.Module, tokenizer: Any, texts: Sequence[str], algorithm: str = "signround", bits: int = 4,
                  group_size: int = 128, iters: int = 200, n_samples: int = 32, seqlen: int = 128,
                  seed: int = 0, device: str = "cpu") -> dict[str, DenseEncoded]:
    """Quantize a deep copy of ``model`` with auto-round, calibrated on ``texts``; the copy is kept on
    the CPU, auto-round computes on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``"model"``:
    where ``model``'s parameters are).

    Returns {parameter name: :class:`DenseEncoded`} for every linear weight auto-round handled
    (its dequantized weight in the original basis on the CPU, see the module docstring, and the bits of
    auto-round's export format). ``model`` is left unchanged.
    """
    from auto_round import AutoRound
    from transformers.pytorch_utils import Conv1D

    if device == "model":
        device = str(next(model.parameters()).device)
    windows = calibration_windows(tokenizer, texts, n_samples, seqlen)
    work = copy.deepcopy(model).to("cpu")
    _drop_hooks(work)
    if algorithm == "awq":
        from auto_round.algorithms.transforms.awq.mappings import resolve_mappings

        if not resolve_mappings(work):
            raise ConfigError(f"auto-round has no AWQ layer mapping for {type(model).__name__} (e.g. GPT-2 and its "
                              "Conv1D layers); use algorithm='signround' or 'rtn' for this model")
    with _isolated_run(), _recording_awq_scales() as records:
        AutoRound(work, tokenizer, dataset=windows,
                  **autoround_kwargs(algorithm, bits, group_size, iters, n_samples, seqlen, seed, device)).quantize()

    # AWQ scales, per layer: input columns multiplied (balance), trailing output rows divided (smooth)
    col_scale: dict[nn.Module, torch.Tensor] = {}
    row_scale: dict[nn.Module, torch.Tensor] = {}
    for smooth, balance, s in records:
        for layer in balance:
            if not isinstance(layer, nn.Linear):
                raise ConfigError(f"auto-round applied AWQ scales to a {type(layer).__name__}; only nn.Linear is handled")
            col_scale[layer] = col_scale.get(layer, torch.ones_like(s)) * s
        if isinstance(smooth, nn.Linear):
            rows = row_scale.setdefault(smooth, torch.ones(smooth.weight.shape[0]))
            rows[-s.numel():] *= s

    names = {id(p): n for n, p in work.named_parameters()}
    out: dict[str, DenseEncoded] = {}
    unquantized: list[str] = []
    for module_name, module in work.named_modules():
        # auto-round tags the layers of its plan; `in_blocks` leaves out the lm_head (kept at 16 bits)
        if not isinstance(module, (nn.Linear, Conv1D)) or not getattr(module, "in_blocks", False):
            continue
        quantized = getattr(module, "bits", 16) <= 8 and getattr(module, "scale", None) is not None
        if quantized:
            weight = _exported_weight(module, transpose=isinstance(module, Conv1D), name=module_name).cpu()
            # packed codes + one fp16 scale and one `bits`-wide zero point per group
            bits = weight.numel() * module.bits + module.scale.numel() * (16 + module.bits)
        else:
            unquantized.append(module_name)
            weight, bits = module.weight.detach().float().cpu(), 16 * module.weight.numel()
        if module in col_scale:
            weight = weight / col_scale[module].view(1, -1)
        if module in row_scale:
            weight = weight * row_scale[module].view(-1, 1)
        out[names[id(module.weight)]] = DenseEncoded(weight.to(module.weight.dtype), bits)
    if unquantized:
        warnings.warn(f"auto-round left {len(unquantized)} layer(s) unquantized (counted at 16 bits): "
                      f"{unquantized[:5]}", stacklevel=2)
    return out


def _exported_weight(module: nn.Module, transpose: bool, name: str) -> torch.Tensor:
    """The weight of auto-round's exported checkpoint: the integer codes of the fake-quantized
    weight auto-round left in ``module`` times the scales as the export stores them (fp16).

    The same as the fake-quantized weight where auto-round keeps fp16 scales in memory (SignRound,
    AWQ); its RTN keeps fp32 scales there, which the export rounds to fp16. Float32 result, in the
    module's layout.
    """
    weight = module.weight.detach().float()
    rows = weight.t() if transpose else weight  # [out, in]: the layout of auto-round's scales
    n_in = rows.shape[1]
    scale = module.scale.detach().float().repeat_interleave(module.group_size, dim=1)[:, :n_in]
    stored = module.scale.detach().half().float().repeat_interleave(module.group_size, dim=1)[:, :n_in]
    codes = torch.round(torch.where(scale == 0, torch.zeros_like(rows), rows / scale))  # zero point cancels
    if float((codes * scale - rows).abs().max()) > 1e-3 * float(scale.abs().max()):
        raise RuntimeError(f"auto-round's weight of {name} is not on its quantization grid; "
                           "qhelpers reads auto-round 0.16.1's layout")
    deployed = codes * stored
    return deployed.t() if transpose else deployed
