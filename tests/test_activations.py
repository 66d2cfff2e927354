"""Tests of qhelpers.measure.activations: capture against hidden_states, masks, and known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qhelpers.measure.activations import (
    ActivationStats,
    activation_entropy,
    capture_residual,
    cosine_similarity,
    effective_dimension,
    flatten_tokens,
    iter_residual_batches,
    linear_cka,
    mean_abs_activation,
    participation_ratio,
    pooled,
    residual_divergence,
)
from qhelpers.models.archs import decoder_layers, get_arch, get_module
from qhelpers.text.encoding import (
    CPU_BATCH_OVERHEAD,
    iter_padded_batches,
    length_batches,
)
from qhelpers.util.errors import ConfigError, MeasurementError

VOCAB = 1000
N_LAYERS = 3

TINY_CONFIGS = {
    "gpt2": dict(n_embd=64, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=128),
    "llama": dict(
        hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "opt": dict(
        hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, ffn_dim=128,
        vocab_size=VOCAB, max_position_embeddings=128, word_embed_proj_dim=64,
    ),
    "bloom": dict(hidden_size=64, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB),
    "gpt_neox": dict(
        hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "qwen2": dict(
        hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "gemma3_text": dict(
        hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, head_dim=16,
    ),
}

_CACHE: dict[str, torch.nn.Module] = {}


def tiny(model_type: str) -> torch.nn.Module:
    if model_type not in _CACHE:
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
        _CACHE[model_type] = AutoModelForCausalLM.from_config(config).eval()
    return _CACHE[model_type]


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second sequence
    return ids, mask


def hook_counts(model):
    return [len(m._forward_hooks) for m in model.modules()]


# ----------------------------------------------------------------------------- capture


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_capture_matches_hidden_states(model_type):
    model = tiny(model_type)
    ids, mask = batch()
    acts = capture_residual(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == N_LAYERS + 1
    assert sorted(acts) == list(range(N_LAYERS))
    for i, a in acts.items():
        assert a.shape == (2, 9, 64) and a.dtype == torch.float32 and a.device.type == "cpu"
        assert not a.requires_grad
    for i in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[i], hs[i + 1], rtol=1e-5, atol=1e-6)
    # The documented finding: the last hidden_states entry is final_norm(last block output).
    final_norm = get_module(model, get_arch(model).final_norm)
    with torch.no_grad():
        torch.testing.assert_close(final_norm(acts[N_LAYERS - 1]), hs[-1], rtol=1e-5, atol=1e-5)
    assert (acts[N_LAYERS - 1] - hs[-1]).abs().max() > 1e-2


def test_capture_opt_without_final_norm_project_out():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "opt", **{**TINY_CONFIGS["opt"], "do_layer_norm_before": False, "word_embed_proj_dim": 32}
    )
    model = AutoModelForCausalLM.from_config(config).eval()  # opt-350m layout
    ids, mask = batch()
    acts = capture_residual(model, ids, mask)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        projected = model.model.decoder.project_out(acts[N_LAYERS - 1])
    for i in range(N_LAYERS - 1):
        torch.testing.assert_close(acts[i], hs[i + 1], rtol=1e-5, atol=1e-6)
    assert acts[N_LAYERS - 1].shape[-1] == 64 and hs[-1].shape[-1] == 32
    torch.testing.assert_close(projected, hs[-1], rtol=1e-5, atol=1e-5)


def test_capture_is_a_copy_and_fp32_for_bf16_model():
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", **TINY_CONFIGS["gpt2"])
    model = AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    ids, mask = batch()
    acts = capture_residual(model, ids, mask, layers=0)
    assert acts[0].dtype == torch.float32
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[0], hs[1].float(), rtol=0, atol=0)


def test_layer_selection_and_validation():
    model = tiny("gpt2")
    ids, mask = batch()
    full = capture_residual(model, ids, mask)
    some = capture_residual(model, ids, mask, layers=[-1, 0, 0])
    assert list(some) == [0, N_LAYERS - 1]
    torch.testing.assert_close(some[N_LAYERS - 1], full[N_LAYERS - 1], rtol=0, atol=0)
    before = hook_counts(model)
    with pytest.raises(ConfigError):
        capture_residual(model, ids, mask, layers=[N_LAYERS])
    with pytest.raises(ConfigError):
        capture_residual(model, ids, mask, layers=-N_LAYERS - 1)
    with pytest.raises(ConfigError):
        capture_residual(model, ids, mask[:, :5])
    assert hook_counts(model) == before
    one = capture_residual(model, ids[0], layers=1)  # 1-D input = one sequence
    assert one[1].shape == (1, 9, 64)


def test_hooks_removed_after_exception():
    model = tiny("llama")
    ids, mask = batch()
    blocks = decoder_layers(model)
    capture_residual(model, ids, mask)  # transformers installs its own hooks on a first forward
    before = hook_counts(model)
    own_block1 = len(blocks[1]._forward_hooks)

    def boom(module, args, output):
        raise RuntimeError("boom in layer 1")

    handle = blocks[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom in layer 1"):
            capture_residual(model, ids, mask)
        # our hooks are gone, only the test's own is left
        assert len(blocks[0]._forward_hooks) == before[list(model.modules()).index(blocks[0])]
        assert len(blocks[1]._forward_hooks) == own_block1 + 1
    finally:
        handle.remove()
    assert hook_counts(model) == before
    # and the model still works normally
    assert sorted(capture_residual(model, ids, mask)) == list(range(N_LAYERS))
    assert hook_counts(model) == before


def test_stop_early_same_values_and_skips_later_layers():
    model = tiny("opt")
    ids, mask = batch()
    full = capture_residual(model, ids, mask)
    calls = []
    handle = decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        early = capture_residual(model, ids, mask, layers=[1, 0], stop_early=True)
        assert calls == []  # block 2 never ran
        capture_residual(model, ids, mask, layers=[0])
        assert calls == [1]
    finally:
        handle.remove()
    for i in (0, 1):
        torch.testing.assert_close(early[i], full[i], rtol=0, atol=0)
    before = hook_counts(model)
    capture_residual(model, ids, mask, layers=[0], stop_early=True)
    assert hook_counts(model) == before


# ----------------------------------------------------------------------------- batched capture


def ragged_sequences():
    """Token sequences of different lengths (1 to 11 tokens), in no particular order."""
    g = torch.Generator().manual_seed(2)
    lengths = [5, 11, 1, 8, 8, 3, 10, 2]
    return [tuple(torch.randint(0, VOCAB, (n,), generator=g).tolist()) for n in lengths]


def test_padded_batches_cover_every_sequence_once_right_padded():
    seqs = ragged_sequences()
    batches = list(iter_padded_batches(seqs, 7, "cpu", 24, 3))
    assert [b.index for b in batches] == length_batches([len(s) for s in seqs], 24, 3, CPU_BATCH_OVERHEAD)
    assert sorted(i for b in batches for i in b.index) == list(range(len(seqs)))
    assert len(batches) > 1 and any(len(b.index) > 1 for b in batches)
    for index, ids, mask in batches:
        assert len(index) <= 3 and (len(index) == 1 or ids.numel() <= 24)
        assert ids.shape == mask.shape == (len(index), max(len(seqs[i]) for i in index))
        for row, i in enumerate(index):
            n = len(seqs[i])
            assert ids[row, :n].tolist() == list(seqs[i]) and (ids[row, n:] == 7).all()
            assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    # no token budget: only max_batch bounds a batch
    assert [len(b.index) for b in iter_padded_batches(seqs, 0, "cpu", None, 4)] == [4, 4]


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_residual_batches_equal_one_unpadded_sequence_at_a_time(model_type):
    model = tiny(model_type)
    seqs = [s for s in ragged_sequences() if len(s) > 1]
    final_norm = get_module(model, get_arch(model).final_norm)
    seen = []
    for index, ids, mask, residual in iter_residual_batches(model, seqs, None, 0, batch_tokens=24, max_batch=3):
        assert sorted(residual) == list(range(N_LAYERS))
        assert ids.shape == mask.shape and int(mask.sum()) == sum(len(seqs[i]) for i in index)
        for row, i in enumerate(index):
            seen.append(i)
            n = len(seqs[i])
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([seqs[i]]), output_hidden_states=True).hidden_states
            for layer, acts in residual.items():
                assert acts.dtype == torch.float32 and acts.shape == (len(index), ids.shape[1], 64)
                got = acts[row, :n]
                if layer == N_LAYERS - 1:  # hidden_states[-1] has the final norm applied
                    with torch.no_grad():
                        got = final_norm(got)
                torch.testing.assert_close(got, alone[layer + 1][0], rtol=1e-5, atol=1e-5)
    assert sorted(seen) == list(range(len(seqs)))


def test_residual_batches_selected_layers_stop_early():
    model = tiny("gpt2")
    seqs = ragged_sequences()[:4]
    calls = []
    handle = decoder_layers(model)[N_LAYERS - 1].register_forward_hook(lambda *a: calls.append(1))
    try:
        batches = list(iter_residual_batches(model, seqs, [1, 0], 0, batch_tokens=None, max_batch=2))
    finally:
        handle.remove()
    assert calls == []  # the last block never ran
    assert [sorted(b.residual) for b in batches] == [[0, 1]] * len(batches)
    assert [b.index for b in batches] == [b.index for b in iter_padded_batches(seqs, 0, "cpu", None, 2)]
    assert list(iter_residual_batches(model, [], None, 0, batch_tokens=None, max_batch=2)) == []


# ----------------------------------------------------------------------------- pooling


def _padded_acts():
    acts = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],  # right padded: last token is padding
            [[-50.0, 7.0], [2.0, 0.0], [4.0, -2.0]],  # left padded: first token is padding
        ]
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    return acts, mask


def test_pooled_mean_and_last_by_hand():
    acts, mask = _padded_acts()
    torch.testing.assert_close(pooled(acts, mask, "mean"), torch.tensor([[2.0, 3.0], [3.0, -1.0]]))
    torch.testing.assert_close(pooled(acts, mask, "last"), torch.tensor([[3.0, 4.0], [4.0, -2.0]]))
    # no mask: plain mean / last position
    torch.testing.assert_close(pooled(acts, None, "mean")[0], torch.tensor([104 / 3, 106 / 3]))
    torch.testing.assert_close(pooled(acts, None, "last")[1], torch.tensor([4.0, -2.0]))
    assert set(pooled({3: acts}, mask)) == {3}
    with pytest.raises(MeasurementError):
        pooled(acts, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ConfigError):
        pooled(acts, mask, "max")


def test_flatten_tokens_and_mean_abs_by_hand():
    acts, mask = _padded_acts()
    rows = flatten_tokens(acts, mask)
    torch.testing.assert_close(rows, torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 0.0], [4.0, -2.0]]))
    assert mean_abs_activation(acts, mask) == pytest.approx((1 + 2 + 3 + 4 + 2 + 0 + 4 + 2) / 8)
    assert mean_abs_activation(acts) == pytest.approx(float(acts.abs().mean()))
    assert mean_abs_activation({0: acts}, mask) == {0: pytest.approx(18 / 8)}


# ----------------------------------------------------------------------------- cosine


def test_cosine_tokenwise_and_pooled_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    b = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-5.0, 5.0]]])
    # token cosines: 1, 0, 0
    assert cosine_similarity(a, b) == pytest.approx(1 / 3)
    assert cosine_similarity(a, b, torch.tensor([[1, 1, 0]])) == pytest.approx(0.5)
    per_token = cosine_similarity(a, b, torch.tensor([[1, 1, 0]]), reduce=False)
    assert per_token[0, :2].tolist() == pytest.approx([1.0, 0.0]) and math.isnan(per_token[0, 2])
    # pooled (mean over first two tokens): a -> (0.5, 0.5), b -> (1.5, 0) => cos = 1/sqrt(2)
    assert cosine_similarity(a, b, torch.tensor([[1, 1, 0]]), pool="mean") == pytest.approx(2 ** -0.5)
    # different lengths: b2 has 2 tokens, pooled with its own mask
    b2 = torch.tensor([[[0.0, 3.0], [0.0, 1.0]]])
    assert cosine_similarity(a, b2, torch.tensor([[1, 1, 0]]), pool="mean", mask_b=torch.ones(1, 2)) == pytest.approx(
        2 ** -0.5
    )
    assert cosine_similarity(a[0], -a[0]) == pytest.approx(-1.0)
    with pytest.raises(ConfigError):
        cosine_similarity(a, b2)


# ----------------------------------------------------------------------------- dimensionality


def test_effective_dimension_planted_subspace():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))
    coeffs = torch.randn(500, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    x = coeffs @ basis.T + 1e-4 * torch.randn(500, 40, generator=g, dtype=torch.float64) + 7.0
    assert effective_dimension(x) == 3
    assert effective_dimension(x, threshold=0.5) == 1
    # independent path: eigenvalues of numpy's covariance, seed 004 T-007's searchsorted rule
    ev = np.sort(np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False)))[::-1]
    for t in (0.5, 0.8, 0.95, 0.99):
        expected = int(np.searchsorted(np.cumsum(ev / ev.sum()), t)) + 1
        assert effective_dimension(x, threshold=t) == expected
    # batch of activations: same answer through the masked path
    acts = x[:480].reshape(4, 120, 40)
    assert effective_dimension(acts, attention_mask=torch.ones(4, 120)) == 3


def test_effective_dimension_equal_variances_exact_threshold():
    # variance spread equally over 4 axes: cumulative ratios 0.25, 0.5, 0.75, 1.0
    eye = torch.eye(4, 6, dtype=torch.float64)
    x = torch.cat([eye, -eye])
    assert effective_dimension(x, threshold=0.75) == 3
    assert effective_dimension(x, threshold=0.76) == 4
    assert effective_dimension(x, threshold=0.95) == 4
    with pytest.raises(ConfigError):
        effective_dimension(x, threshold=0.0)
    with pytest.raises(MeasurementError):
        effective_dimension(torch.ones(5, 3))


def test_participation_ratio_by_hand():
    eye = torch.eye(3, 5, dtype=torch.float64)
    assert participation_ratio(torch.cat([eye, -eye])) == pytest.approx(3.0)
    scaled = eye * torch.tensor([1.0, 1.0, 2 ** 0.5, 0, 0], dtype=torch.float64)
    # covariance eigenvalues proportional to (1, 1, 2): (4)^2 / (1 + 1 + 4) = 8/3
    assert participation_ratio(torch.cat([scaled, -scaled])) == pytest.approx(8 / 3)
    line = torch.arange(10.0)[:, None] * torch.tensor([[1.0, 2.0, 3.0]])
    assert participation_ratio(line) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- entropy


def test_activation_entropy_known_answers():
    x = torch.tensor([0.0, 0.1, 1.0, 1.1, 2.0, 2.1, 3.0, 3.1])
    assert activation_entropy(x, bins=4) == pytest.approx(2.0)
    assert activation_entropy(torch.tensor([0.0, 0.0, 0.0, 5.0]), bins=2) == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )
    assert activation_entropy(torch.full((10,), 3.0), bins=8) == 0.0
    # padding excluded: the padded token's value 99 would otherwise occupy a bin
    acts = torch.tensor([[[0.0], [1.0], [99.0]]])
    assert activation_entropy(acts, bins=2, attention_mask=torch.tensor([[1, 1, 0]])) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    gauss = torch.from_numpy(rng.standard_normal(1_000_000))
    h = activation_entropy(gauss, bins=400, differential=True)
    assert h == pytest.approx(0.5 * math.log2(2 * math.pi * math.e), abs=0.01)
    uni = torch.from_numpy(rng.uniform(0.0, 4.0, 1_000_000))
    assert activation_entropy(uni, bins=50, value_range=(0.0, 4.0), differential=True) == pytest.approx(2.0, abs=0.01)


# ----------------------------------------------------------------------------- CKA


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(16, 8, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        200, 8, generator=g, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 5.0, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(y, x) == pytest.approx(base, rel=1e-10)
    # not invariant to anisotropic scaling -- the checks above can fail
    stretch = torch.ones(16, dtype=torch.float64)
    stretch[0] = 20.0
    assert abs(linear_cka(x * stretch, y) - base) > 1e-3
    assert linear_cka(x * stretch, x) < 0.99
    # 1-D features: CKA = squared Pearson correlation
    u = torch.tensor([[1.0], [2.0], [3.0], [4.0], [6.0]])
    v = torch.tensor([[1.0], [4.0], [9.0], [15.0], [40.0]])
    r = np.corrcoef(u.flatten().numpy(), v.flatten().numpy())[0, 1]
    assert linear_cka(u, v) == pytest.approx(r ** 2)
    with pytest.raises(ConfigError):
        linear_cka(x, y[:-1])


# ----------------------------------------------------------------------------- divergence


def test_residual_divergence_by_hand():
    b = torch.ones(1, 3, 4)
    a = b * 1.1
    a[0, 2] = -50.0  # padding position: ignored under the mask
    mask = torch.tensor([[1, 1, 0]])
    c = torch.zeros(1, 3, 4)
    c[..., 0] = 1.0  # orthogonal-ish: cos with ones = 1/2
    df = residual_divergence({0: a, 1: c}, {0: b, 1: b}, mask)
    assert df["layer"].tolist() == [0, 1]
    assert df.loc[0, "rel_l2"] == pytest.approx(0.1)
    assert df.loc[0, "cosine"] == pytest.approx(1.0)
    assert df.loc[1, "rel_l2"] == pytest.approx(math.sqrt(3) / 2)  # ||(0,-1,-1,-1)|| / ||(1,1,1,1)||
    assert df.loc[1, "cosine"] == pytest.approx(0.5)
    unmasked = residual_divergence({0: a}, {0: b})
    assert unmasked.loc[0, "rel_l2"] > 1.0
    with pytest.raises(ConfigError):
        residual_divergence({0: a}, {0: b, 1: b})


def test_divergence_of_perturbed_model_on_real_capture():
    model = tiny("gpt2")
    ids, mask = batch()
    ref = capture_residual(model, ids, mask)
    same = residual_divergence(ref, ref, mask)
    assert (same["rel_l2"] == 0).all() and np.allclose(same["cosine"], 1.0)


def test_namespace_exposes_functions():
    assert ActivationStats.linear_cka is linear_cka
    assert ActivationStats.effective_dimension(torch.cat([torch.eye(2, 3), -torch.eye(2, 3)])) == 2
