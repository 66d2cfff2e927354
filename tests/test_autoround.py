"""auto-round backend (qhelpers.quant.autoround) against auto-round called directly.

Known answers: ``auto_round.AutoRound(...).quantize()`` run by the test itself on its own copy of
the model with the same calibration windows and seed (the weights it leaves in each layer), the
checkpoint auto-round exports (``save_quantized(format="auto_round")``: its packed codes, zero
points and fp16 scales, dequantized by hand, and its byte count), and hand-built token windows.
Settings are tiny (2 SignRound steps, 4 windows of 32 tokens) to keep the default run short.
"""
from __future__ import annotations

import copy
import gc
import glob

import pytest
import torch

from qhelpers.quant.autoround import AutoRoundMethod, calibration_windows, run_autoround
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.methods import TensorRole
from qhelpers.util.errors import ConfigError

AutoRound = pytest.importorskip("auto_round").AutoRound

TINY = dict(bits=4, group_size=32, n_samples=4, seqlen=32, seed=0)
IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])


def direct_autoround(loaded, algorithm, windows, iters=2, device="cpu"):
    """auto-round on a copy of the model, as its README calls it (CPU unless told, fixed seed, no bf16
    autocast). gc.freeze only makes auto-round's many gc.collect() calls cheap; it changes no result."""
    work = copy.deepcopy(loaded.model)
    extra = {"iters": iters} if algorithm == "signround" else {}
    gc.freeze()
    try:
        compressor = AutoRound(work, loaded.tokenizer, alg_configs=algorithm, bits=4, group_size=32, dataset=windows,
                               nsamples=4, seqlen=32, seed=0, device_map=device, amp=False, low_cpu_mem_usage=False,
                               enable_torch_compile=False, **extra)
        compressor.quantize()
    finally:
        gc.unfreeze()
    return work, compressor


def windows_of(loaded, calibration="en"):
    from qhelpers.text.calibration import calibration_texts

    return calibration_windows(loaded.tokenizer, calibration_texts(calibration, tokenizer=loaded.tokenizer), 4, 32)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ-style packing: value j of a word sits at bits [bits*j, bits*(j+1)), along ``dim``."""
    shifts = torch.arange(0, 32, bits)
    if dim == 0:
        return ((packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)).reshape(-1, packed.shape[1])
    return ((packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & (2**bits - 1)).reshape(packed.shape[0], -1)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def exported(compressor, folder, names, conv1d):
    """{weight name: (hand-dequantized weight, bits stored)} of auto-round's exported checkpoint
    (qweight: codes packed along the input dim; qzeros: zero point - 1, GPTQ convention; fp16 scales)."""
    from safetensors.torch import load_file

    compressor.save_quantized(str(folder), format="auto_round")
    state = {}
    for path in glob.glob(str(folder / "*.safetensors")):
        state.update(load_file(path))
    out = {}
    for name in names:
        layer = name[: -len(".weight")]
        qweight, qzeros, scales = state[f"{layer}.qweight"], state[f"{layer}.qzeros"], state[f"{layer}.scales"]
        codes = unpack_int32(qweight, 4, dim=0)  # [in, out]
        zeros = unpack_int32(qzeros, 4, dim=1) + 1
        group = torch.arange(codes.shape[0]) // 32
        weight = (codes - zeros[group]).float() * scales[group].float()  # [in, out]: Conv1D's layout
        out[name] = (weight if conv1d else weight.t(), sum(8 * t.numel() * t.element_size() for t in (qweight, qzeros, scales)))
    return out


def check_against_direct(loaded, algorithm, folder, got, prepared):
    work, compressor = direct_autoround(loaded, algorithm, windows_of(loaded))
    in_memory = {n: p.detach().clone() for n, p in work.named_parameters()}
    checkpoint = exported(compressor, folder, list(got), conv1d=loaded.arch.model_type == "gpt2")
    assert len(got) == 4 * (4 if loaded.arch.model_type == "gpt2" else 7)
    for name, tensor in got.items():
        weight, bits = checkpoint[name]
        assert torch.equal(tensor, weight), name
        assert prepared[name].storage_bits == bits, name
        if algorithm == "signround":  # its in-memory scales are fp16 already
            assert torch.equal(tensor, in_memory[name]), name
        else:  # auto-round's RTN keeps fp32 scales in memory; its checkpoint stores them in fp16
            assert torch.allclose(tensor, in_memory[name], rtol=1e-3, atol=0), name


def test_signround_equals_direct_autoround_and_its_exported_checkpoint(tiny_model, tmp_path):
    loaded = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    reference = logits(loaded.model)
    method = AutoRoundMethod("signround", iters=2, **TINY)
    engine = QuantEngine(loaded)
    variant = Variant("sr", method)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    got = dict(engine.quantized_weights(variant))
    assert torch.equal(torch.get_rng_state(), rng)  # auto-round reseeds; the global state is given back
    for name, tensor in loaded.model.named_parameters():
        assert torch.equal(tensor, before[name]), f"prepare changed {name}"
    for name, tensor in got.items():
        assert not torch.equal(tensor, before[name]), name
    check_against_direct(loaded, "signround", tmp_path, got, engine._prepared[method])
    # 4-bit codes + an fp16 scale and a 4-bit zero point per 32 weights
    assert engine.bits_per_weight(variant) == 4 + 20 / 32

    with engine.applied(variant):
        assert not torch.equal(logits(loaded.model), reference)
    for name, tensor in loaded.model.named_parameters():
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(logits(loaded.model), reference)


def test_awq_model_equals_direct_autoround_awq_model(tiny_model):
    """AWQ folds its scales into the norms; qhelpers hands back the equivalent weights in the
    original basis, so the engine's model computes auto-round's AWQ model (up to fp32 rounding)."""
    loaded = tiny_model("llama")
    engine = QuantEngine(loaded)
    variant = Variant("awq", AutoRoundMethod("awq", **TINY))
    work, _ = direct_autoround(loaded, "awq", windows_of(loaded))
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(dict(work.named_parameters())[norm], loaded.model.get_parameter(norm))  # AWQ did act
    expected = logits(work)
    with engine.applied(variant):
        got = logits(loaded.model)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, logits(loaded.model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, algorithm", [("llama", "rtn"), ("gpt2", "signround"), ("gpt2", "rtn")])
def test_weights_equal_direct_autoround(tiny_model, tmp_path, arch, algorithm):
    loaded = tiny_model(arch)
    method = AutoRoundMethod(algorithm, iters=2, **TINY)
    engine = QuantEngine(loaded)
    got = dict(engine.quantized_weights(Variant(algorithm, method)))
    check_against_direct(loaded, algorithm, tmp_path, got, engine._prepared[method])


def test_not_prepared_under_an_applied_variant(tiny_model):
    """Calibration must see the loaded weights: the engine refuses to prepare while another variant's
    swap-in hooks are attached, and prepares normally after restore."""
    from qhelpers.quant.hqq import HQQMethod

    loaded = tiny_model("llama")
    method = AutoRoundMethod("awq", **TINY)
    clean = dict(QuantEngine(loaded).quantized_weights(Variant("awq", method)))
    engine = QuantEngine(loaded)
    with engine.applied(Variant("hqq2", HQQMethod(bits=2, group_size=32))):
        with pytest.raises(ConfigError, match="restore"):
            dict(engine.quantized_weights(Variant("awq", method)))
    after = dict(engine.quantized_weights(Variant("awq", method)))
    assert all(torch.equal(clean[name], after[name]) for name in clean)


def test_awq_on_gpt2_is_refused_before_running(tiny_model):
    loaded = tiny_model("gpt2")
    texts = ["All human beings are born free and equal in dignity and rights. " * 20]
    with pytest.raises(ConfigError, match="no AWQ layer mapping for GPT2LMHeadModel"):
        run_autoround(loaded.model, loaded.tokenizer, texts, algorithm="awq", n_samples=2, seqlen=32)


class CharTokenizer:
    """One token per character (its code point); a BOS (1) before each text unless told not to."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_calibration_windows_by_hand():
    # stream: a b c d e f \n \n g h i j (12 tokens); windows of BOS + 3 tokens -> 4 windows; 2 taken: 0 and 2
    windows = calibration_windows(CharTokenizer(), ["abcdef", "ghij"], n_samples=2, seqlen=4)
    assert [w.tolist() for w in windows] == [[[1, 97, 98, 99]], [[1, 10, 10, 103]]]
    with pytest.raises(ConfigError, match="12 tokens: 5 windows of 4 tokens need 15"):
        calibration_windows(CharTokenizer(), ["abcdef", "ghij"], n_samples=5, seqlen=4)
    with pytest.raises(ConfigError, match="no calibration text"):
        calibration_windows(CharTokenizer(), [], n_samples=1, seqlen=4)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(algorithm="gptq"), "unknown auto-round algorithm 'gptq'"),
    (dict(bits=5), "bits must be one of"),
    (dict(bits=4.0), "bits must be an int"),
    (dict(group_size=4), "group_size must be an int >= 8"),
    (dict(iters=0), "iters must be an int >= 1"),
    (dict(n_samples=0), "n_samples must be an int >= 1"),
    (dict(seqlen=2), "seqlen must be an int >= 8"),
    (dict(calibration="none"), "needs calibration text: calibration must be one of en, "),
    (dict(calibration="xx"), "got 'xx'"),
    (dict(device="gpu"), "device must be 'cpu', 'model' .* got 'gpu'"),
    (dict(device="cuda:x"), "got 'cuda:x'"),
])
def test_bad_configuration_raises(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        AutoRoundMethod(**kwargs)


def test_label_hashable_and_needs_a_tokenizer(tiny_model):
    assert AutoRoundMethod().label == "signround4-g128-i200-en"
    assert AutoRoundMethod("awq", 3, 64, calibration="sw").label == "awq3-g64-sw"
    assert AutoRoundMethod("rtn", iters=0).needs_calibration
    assert len({AutoRoundMethod(), AutoRoundMethod(), AutoRoundMethod(seed=1)}) == 2
    engine = QuantEngine(tiny_model("llama").model)  # a bare module: no tokenizer
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        engine.apply(Variant("sr", AutoRoundMethod(iters=2, **TINY)))
    assert engine.active is None


def test_tensors_outside_the_blocks_are_refused():
    role = TensorRole("lm_head.weight", "lm_head", None, 4, 0)
    with pytest.raises(ConfigError, match="use scope='linear'"):
        AutoRoundMethod().encode(torch.zeros(4, 4), role, None, {})


def test_auto_rounds_collections_skip_what_was_alive_before_it_even_after_a_callers_freeze(tiny_model, monkeypatch):
    """auto-round calls gc.collect() about 3 times per block; each must not walk the objects alive before
    the run (0.33 s a call on the H100 host, 35 of an AWQ run's 57 s), also where the caller had frozen
    objects already, as that host's Python does at start-up. Afterwards nothing is left frozen."""
    from qhelpers.text.calibration import calibration_texts

    loaded = tiny_model("llama")
    texts = calibration_texts("en", tokenizer=loaded.tokenizer)
    gc.freeze()  # the caller's
    alive = [[] for _ in range(200_000)]  # created after the caller's freeze, alive through the run
    walked: list[int] = []
    collect = gc.collect

    def counting_collect(*args, **kwargs):
        walked.append(len(gc.get_objects()))  # the objects a full collection traverses
        return collect(*args, **kwargs)

    monkeypatch.setattr(gc, "collect", counting_collect)
    try:
        run_autoround(loaded.model, loaded.tokenizer, texts, algorithm="awq", **TINY)
    finally:
        gc.unfreeze()
    assert len(walked) >= 2 and max(walked) < len(alive) // 4, walked
    assert gc.get_freeze_count() == 0


# ----------------------------------------------------------------------------- device


def test_device_defaults_to_the_models_or_the_environment(monkeypatch):
    from qhelpers.quant.autoround import DEVICE_ENV, autoround_kwargs

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert AutoRoundMethod().device == "model" and AutoRoundMethod().to_dict()["device"] == "model"
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert AutoRoundMethod().device == "cpu"
    assert AutoRoundMethod() != AutoRoundMethod(device="model")  # cached apart: their results may differ
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ConfigError, match=r"got 'tpu' \(from \$QHELPERS_AUTOROUND_DEVICE\)"):
        AutoRoundMethod()
    assert autoround_kwargs("awq", 4, 32, 1, 4, 32, 0)["device_map"] == "cpu"
    assert autoround_kwargs("awq", 4, 32, 1, 4, 32, 0, device="cuda")["device_map"] == "cuda"
    assert autoround_kwargs("awq", 4, 32, 1, 4, 32, 0, device="cuda:1")["device_map"] == 1  # not a layer map
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here; use 'cpu' or 'model'"):
            AutoRoundMethod(device="cuda")


def test_model_device_on_a_cpu_model_is_the_cpu_run(tiny_model):
    """device='model' follows the model's parameters: on a CPU model, the CPU run bit for bit."""
    loaded = tiny_model("llama")
    cpu = dict(QuantEngine(loaded).quantized_weights(Variant("awq", AutoRoundMethod("awq", device="cpu", **TINY))))
    follow = dict(QuantEngine(loaded).quantized_weights(Variant("awq", AutoRoundMethod("awq", device="model", **TINY))))
    assert cpu.keys() == follow.keys() and all(torch.equal(cpu[n], follow[n]) for n in cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_awq_on_the_gpu_equals_direct_autoround_on_the_gpu(tiny_model):
    """device='cuda': the model the engine computes equals auto-round's own AWQ model run on the GPU
    (the same check as on the CPU above), and stays close to the CPU run's."""
    loaded = tiny_model("llama")
    work, _ = direct_autoround(loaded, "awq", windows_of(loaded), device="cuda")
    expected = logits(work.to("cpu"))
    engine = QuantEngine(loaded)
    with engine.applied(Variant("awq-gpu", AutoRoundMethod("awq", device="cuda", **TINY))):
        got = logits(loaded.model)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    with engine.applied(Variant("awq-cpu", AutoRoundMethod("awq", device="cpu", **TINY))):
        on_cpu = logits(loaded.model)
    assert (got - on_cpu).abs().max() < 0.05 * on_cpu.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_device_on_a_gpu_model_is_the_gpu_run(tiny_model):
    """device='model' (the default) on a model loaded on the GPU computes there: the same weights as
    device='cuda' (a model on 'cuda:0' reaches auto-round as the index 0, not as the string)."""
    # float32 on both: a model loaded on CUDA defaults to bfloat16, whose AWQ is another computation
    on_gpu = tiny_model("llama", device="cuda", dtype="fp32")
    follow = dict(QuantEngine(on_gpu).quantized_weights(Variant("awq", AutoRoundMethod("awq", device="model", **TINY))))
    on_cpu = tiny_model("llama")
    cuda = dict(QuantEngine(on_cpu).quantized_weights(Variant("awq", AutoRoundMethod("awq", device="cuda", **TINY))))
    assert follow.keys() == cuda.keys() and all(torch.equal(follow[n].cpu(), cuda[n].cpu()) for n in cuda)
    # and the check can tell the devices apart: the CPU run of the same model picks other weights
    cpu = dict(QuantEngine(on_cpu).quantized_weights(Variant("awq", AutoRoundMethod("awq", device="cpu", **TINY))))
    assert not all(torch.equal(cpu[n], cuda[n].cpu()) for n in cuda)
