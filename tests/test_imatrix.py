"""Importance matrices (qhelpers.quant.imatrix) against hand computations on tiny models.

Known answers: the input of a layer's q/k/v projections is ``input_layernorm`` (Llama) or ``ln_1``
(GPT-2) applied to the layer's input, which the model returns as ``hidden_states`` (no hook
involved); the input of the MLP's output projection is rebuilt from forward hooks on *other*
modules' outputs (``act(gate) * up``, ``act(c_fc)``). The importance is llama.cpp's: per input
channel, the sum of squared activations over tokens and the token count, mean = sum / count.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qhelpers.models.loading import load_model
from qhelpers.quant.imatrix import ImportanceMatrix, compute_imatrix, default_imatrix_names
from qhelpers.quant.methods import tensor_roles
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import ConfigError

TEXTS = [
    "Hello world, this is a test of the importance matrix.",
    "Kwa",
    "Une phrase en français, un peu plus longue que les autres, pour que le lot ait du remplissage.",
]


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny:llama")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny:gpt2")


def _one_by_one(loaded, texts, capture):
    """Run each text alone (no padding) and add up ``capture(out, hooked) -> {name: x [tokens, k]}``
    as float64 sums of squares and token counts."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for text in texts:
        ids = torch.tensor([encode_text(loaded.tokenizer, text)])
        hooked: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda mod, a, out, key=key, into=hooked: into.__setitem__(key, out.detach()))
                   for key, m in capture.modules(loaded.model).items()]
        try:
            with torch.no_grad():
                out = loaded.model(input_ids=ids, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        for name, x in capture.inputs(loaded.model, out, hooked).items():
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
    return sums, counts


class LlamaCapture:
    layer = 1

    def modules(self, model):
        mlp = model.model.layers[self.layer].mlp
        return {"gate": mlp.gate_proj, "up": mlp.up_proj}

    def inputs(self, model, out, hooked):
        layer = model.model.layers[self.layer]
        x = layer.input_layernorm(out.hidden_states[self.layer])
        p = f"model.layers.{self.layer}."
        down_in = layer.mlp.act_fn(hooked["gate"]) * hooked["up"]
        return {p + "self_attn.q_proj.weight": x, p + "self_attn.k_proj.weight": x,
                p + "self_attn.v_proj.weight": x, p + "mlp.down_proj.weight": down_in}


class GPT2Capture:
    layer = 2

    def modules(self, model):
        return {"fc": model.transformer.h[self.layer].mlp.c_fc}

    def inputs(self, model, out, hooked):
        block = model.transformer.h[self.layer]
        p = f"transformer.h.{self.layer}."
        return {p + "attn.c_attn.weight": block.ln_1(out.hidden_states[self.layer]),
                p + "mlp.c_proj.weight": block.mlp.act(hooked["fc"])}


@pytest.mark.parametrize("arch,capture", [("llama", LlamaCapture()), ("gpt2", GPT2Capture())])
def test_sums_and_counts_match_a_hand_computation(arch, capture, request):
    loaded = request.getfixturevalue(arch)
    im = compute_imatrix(loaded, None, TEXTS, tensor_roles(loaded.model), batch_size=3)
    sums, counts = _one_by_one(loaded, TEXTS, capture)
    n_tokens = sum(len(encode_text(loaded.tokenizer, t)) for t in TEXTS)
    for name, expected in sums.items():
        assert im.count(name) == counts[name] == n_tokens
        np.testing.assert_allclose(im.sum(name), expected, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(im.vector(name), expected / n_tokens, rtol=1e-5)
        assert im.vector(name).dtype == np.float32
    assert im.n_tokens == n_tokens


def test_fused_gpt2_attention_and_conv1d_use_the_input_dimension(gpt2):
    roles = tensor_roles(gpt2.model)
    im = compute_imatrix(gpt2, None, TEXTS[:1], roles)
    d = gpt2.model.config.n_embd
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert dict(gpt2.model.named_parameters())[c_attn].shape == (d, 3 * d)  # Conv1D: [in, out]
    assert im.vector(c_attn).shape == (d,)  # one vector for q, k and v together
    assert im.vector("transformer.h.0.mlp.c_fc.weight").shape == (d,)
    assert im.vector("transformer.h.0.mlp.c_proj.weight").shape == (4 * d,)
    # the default names are the per-layer matrices, as llama-imatrix's blk.* (no embedding, no head)
    assert set(im.names) == set(default_imatrix_names(roles))
    assert "transformer.wte.weight" not in im and len(im.names) == 4 * gpt2.model.config.n_layer


def test_padding_is_ignored(llama):
    roles = tensor_roles(llama.model)
    calls = []
    handle = llama.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        batched = compute_imatrix(llama, None, TEXTS, roles, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1  # all three texts in one padded batch
    alone = [compute_imatrix(llama, None, [t], roles) for t in TEXTS]
    summed = alone[0] + alone[1] + alone[2]
    assert summed.names == batched.names
    for name in batched.names:
        assert batched.count(name) == summed.count(name)
        np.testing.assert_allclose(batched.sum(name), summed.sum(name), rtol=1e-5, atol=1e-9)


def test_max_length_cuts_each_text(llama):
    roles = tensor_roles(llama.model)
    im = compute_imatrix(llama, None, TEXTS, roles, max_length=4)
    assert im.n_tokens == sum(min(4, len(encode_text(llama.tokenizer, t))) for t in TEXTS)


def test_deterministic_hashable_and_equal_by_content(llama):
    roles = tensor_roles(llama.model)
    a = compute_imatrix(llama, None, TEXTS, roles, source="a")
    b = compute_imatrix(llama, None, TEXTS, roles, source="b")
    c = compute_imatrix(llama, None, TEXTS[:2], roles)
    assert a == b and hash(a) == hash(b) and a.digest == b.digest  # the label is not content
    assert a != c and a.digest != c.digest
    assert len({a, b, c}) == 2 and {a: 1}[b] == 1

    @dataclasses.dataclass(frozen=True)
    class Method:  # how a frozen method carries one
        imatrix: ImportanceMatrix | None = None

    assert hash(Method(a)) == hash(Method(b)) and Method(a) == Method(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.n_tokens = 0  # type: ignore[misc]
    with pytest.raises(ValueError):
        a.sum(a.names[0])[0] = 1.0  # the arrays are read-only too
    assert a.to_dict() == {"digest": a.digest, "n_tensors": len(a.names), "n_tokens": a.n_tokens, "source": "a"}


def test_from_sums_mean_and_merge_follow_llama_cpp():
    im = ImportanceMatrix.from_sums({"w": [2.0, 8.0], "never": [0.0, 0.0, 0.0]}, {"w": 4, "never": 0})
    np.testing.assert_array_equal(im.vector("w"), np.array([0.5, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(im.vector("never"), np.ones(3, dtype=np.float32))  # no data: 1.0, as llama-quantize
    assert len(im) == 2 and im.names == ("never", "w") and "w" in im
    np.testing.assert_array_equal(im["w"], im.vector("w"))
    other = ImportanceMatrix.from_sums({"w": [1.0, 1.0], "never": [3.0, 0.0, 3.0]}, {"w": 2, "never": 3})
    merged = im + other
    np.testing.assert_array_equal(merged.vector("w"), np.array([0.5, 1.5], dtype=np.float32))  # (2+1)/6, (8+1)/6
    np.testing.assert_array_equal(merged.vector("never"), np.array([1.0, 0.0, 1.0], dtype=np.float32))
    assert merged == ImportanceMatrix.from_sums({"never": [3.0, 0.0, 3.0], "w": [3.0, 9.0]}, {"w": 6, "never": 3})
    with pytest.raises(ConfigError, match="different tensors"):
        im + ImportanceMatrix.from_sums({"w": [1.0, 1.0]}, {"w": 1})


def test_bad_inputs_name_the_fix(gpt2):
    roles = tensor_roles(gpt2.model)
    with pytest.raises(ConfigError, match="multiplies its input"):
        compute_imatrix(gpt2, None, TEXTS, roles, names=["transformer.wte.weight"])
    with pytest.raises(ConfigError, match="tensor_roles"):
        compute_imatrix(gpt2, None, TEXTS, roles, names=["transformer.h.0.nope.weight"])
    with pytest.raises(ConfigError, match="no calibration texts"):
        compute_imatrix(gpt2, None, [], roles)
    with pytest.raises(ConfigError, match="tokenizer"):
        compute_imatrix(gpt2.model, None, TEXTS, roles)
    im = compute_imatrix(gpt2, None, TEXTS[:1], roles)
    with pytest.raises(ConfigError, match="no importance-matrix entry"):
        im.vector("transformer.wte.weight")


def test_calibration_imatrix_is_computed_once_per_model_and_set(monkeypatch):
    import qhelpers.quant.imatrix as im
    from qhelpers.models.loading import load_model
    from qhelpers.quant.methods import tensor_roles

    loaded = load_model("tiny:llama")
    roles = tensor_roles(loaded.model)
    full = im.calibration_texts
    monkeypatch.setattr(im, "calibration_texts", lambda name, **kw: full(name)[:3])  # 3 paragraphs: fast
    calls = []
    real = im.compute_imatrix
    monkeypatch.setattr(im, "compute_imatrix", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = im.calibration_imatrix(loaded, loaded.tokenizer, "sw", roles)
    b = im.calibration_imatrix(loaded, loaded.tokenizer, "sw", roles)
    assert a is b and len(calls) == 1
    c = im.calibration_imatrix(loaded, loaded.tokenizer, "en", roles)
    assert len(calls) == 2 and c != a
    # the same numbers as computing it directly on the same texts
    assert real(loaded, loaded.tokenizer, im.calibration_texts("sw"), roles) == a
    # new storage (e.g. a reloaded or swapped weight) is measured again
    param = next(loaded.model.parameters())
    param.data = param.data.clone()
    im.calibration_imatrix(loaded, loaded.tokenizer, "sw", roles)
    assert len(calls) == 3
