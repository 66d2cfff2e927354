"""Prefix caching (qhelpers.quant.prefix_cache): cached sweeps equal uncached ones; planning, guards,
budgets; out-of-memory retry and CUDA batch sizing in the Scorer."""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from qhelpers.measure.scoring import (
    MeasureConfig,
    Scorer,
    auto_batch_tokens,
    corpus_scorer,
)
from qhelpers.measure.sweep import run_sweep
from qhelpers.models.archs import decoder_layers
from qhelpers.quant import prefix_cache as prefix_mod
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.prefix_cache import PrefixCache, PrefixSignature, prefix_signature, run_order
from qhelpers.quant.protection import ProtectionSpec
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.text.corpora import Corpus

ARCHS = ["gpt2", "opt", "bloom", "gpt_neox", "llama", "qwen2", "gemma3_text"]
INT4 = QuantConfig(bits=4, granularity="channel")
TEXTS = {
    "en": ["All human beings are born free and equal in dignity and rights.", "Everyone has the right to life."],
    "sw": ["Kila mtu anayo haki ya kuishi, uhuru na usalama wa maisha yake.", "Watu wote wamezaliwa huru."],
    "he": ["השועל החום המהיר קופץ מעל הכלב העצלן.", "לכל אדם הזכות לחיים."],
}
# small batches so that every sweep runs several batches of different widths
MEASURE = MeasureConfig(batch_tokens=48)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_texts("tiny", TEXTS)


def sweep_variants(n_layers: int) -> list[Variant]:
    """Protected layers, element masks, fused-row protection, seed scope (quantized embeddings)."""
    return [
        Variant("all", INT4),
        Variant("p1", INT4, ProtectionSpec(layers=(1,))),
        Variant("p0", INT4, ProtectionSpec(layers=(0,))),
        Variant(f"p{n_layers - 1}", INT4, ProtectionSpec(layers=(n_layers - 1,))),
        Variant("first2", INT4, ProtectionSpec(layers=(0, 1))),
        Variant("mag", INT4, ProtectionSpec(magnitude_fraction=0.02)),
        Variant("mag_p2", INT4, ProtectionSpec(layers=(2,), magnitude_fraction=0.02)),
        Variant("q_rows_L2", INT4, ProtectionSpec(components=("L2.attn_q",))),
        Variant("seed_all", QuantConfig.seed(), scope="seed"),
        Variant("seed_p1", QuantConfig.seed(), ProtectionSpec(layers=(1,)), scope="seed"),
    ]


def per_token(result) -> np.ndarray:
    return (result.scores["nll"] / result.scores["n_tokens"]).to_numpy()


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_sweep_equals_uncached(arch, tiny_model, corpus):
    loaded = tiny_model(arch)
    variants = sweep_variants(loaded.n_layers)
    engine = QuantEngine(loaded)
    scorer = corpus_scorer(loaded, corpus, MEASURE)
    assert len(scorer.batches) >= 3
    hooks = hook_counts(loaded.model)
    plain = run_sweep(loaded, corpus, variants, engine=engine, scorer=scorer, progress=False, prefix_cache=False)
    cached = run_sweep(loaded, corpus, variants, engine=engine, scorer=scorer, progress=False)
    np.testing.assert_array_less(np.abs(per_token(plain) - per_token(cached)), 1e-5)
    # results in the caller's order although the cached sweep ran in another
    assert list(cached.scores["config"].unique()) == ["fp"] + [v.name for v in variants]
    assert cached.configs == plain.configs == list(cached.seconds) == list(cached.overhead["config"])
    assert cached.run_order[:2] == ["fp", "all"] and cached.run_order != cached.configs
    stats = cached.prefix_stats
    assert stats["disabled"] is None and stats["hits"] > 0 and stats["layers_skipped"] > 0
    # nothing left behind: no forward stubs, no hooks, no cached tensors
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(loaded.model))
    assert hook_counts(loaded.model) == hooks
    assert len(scorer.prefix_cache) == 0 and scorer.prefix_cache.nbytes == 0


def test_signatures_and_plan(tiny_model):
    loaded = tiny_model("gpt2")  # 4 layers, lm_head tied to wte
    engine = QuantEngine(loaded)
    n = loaded.n_layers
    sig = {v.name: prefix_signature(engine, v) for v in [Variant("fp")] + sweep_variants(n)}
    assert sig["fp"] == prefix_signature(engine) and len(sig["fp"].boundaries) == n + 1
    assert sig["all"].common_depth(sig["p1"]) == 1
    assert sig["all"].common_depth(sig["p3"]) == 3
    assert sig["fp"].common_depth(sig["p0"]) == 1  # layer 0 protected = layer 0 in fp
    assert sig["fp"].common_depth(sig["first2"]) == 2
    # seed scope quantizes the (tied) embedding: boundary 0 differs from every linear-scope variant
    assert sig["seed_all"].boundaries[0] != sig["fp"].boundaries[0]
    assert sig["seed_all"].boundaries[0] != sig["all"].boundaries[0]
    assert sig["seed_all"].common_depth(sig["seed_p1"]) == 1
    assert sig["mag"].common_depth(sig["mag_p2"]) == 2 and sig["mag"].common_depth(sig["all"]) == 0
    assert sig["all"].common_depth(sig["q_rows_L2"]) == 2
    assert sum(sig["all"].quantized_layers) == n and sum(sig["p1"].quantized_layers) == n - 1

    names = list(sig)
    order = [names[i] for i in run_order([sig[k] for k in names])]
    assert order[0] == "fp" and order.index("all") < order.index("p1")
    starts = dict(zip(order, PrefixCache(1 << 30).plan([sig[k] for k in order])))
    assert starts["fp"] == 0 and starts["all"] == 0 and starts["seed_all"] == 0
    assert starts["p0"] == 1 and starts["p1"] == 1 and starts["p3"] == 3 and starts["first2"] == 2
    assert starts["seed_p1"] == 1 and starts["mag_p2"] == 2 and starts["q_rows_L2"] == 2


def test_resident_mode_and_weight_edits_change_nothing_or_everything(tiny_model):
    loaded = tiny_model("llama", fresh=True)
    streaming, resident = QuantEngine(loaded), QuantEngine(loaded, resident=True)
    variant = Variant("p1", INT4, ProtectionSpec(layers=(1,)))
    expected = prefix_signature(streaming, variant)
    with resident.applied(variant):
        assert prefix_signature(resident) == expected  # mode is irrelevant, originals fingerprinted
    param = loaded.model.model.layers[2].mlp.up_proj.weight
    with torch.no_grad():
        param.mul_(1.0)  # an in-place edit (version counter)
    edited = prefix_signature(streaming, variant)
    assert edited.common_depth(expected) == 2
    loaded.model.model.layers[3].mlp.up_proj.weight.data[0, :] += 1.0  # through .data: sampled checksum
    assert prefix_signature(streaming, variant).common_depth(edited) == 3


def test_untied_lm_head_and_final_norm_are_outside_the_prefix(tiny_model, corpus):
    loaded = tiny_model("gpt_neox")  # untied lm_head
    n = loaded.n_layers
    everything_but_head = ProtectionSpec(layers=tuple(range(n)), components=("embed_tokens", "final_norm"))
    head_only = Variant("head_only", INT4, everything_but_head, scope="all")
    engine = QuantEngine(loaded)
    assert list(engine.plan(head_only).tensors) == ["lm_head.weight"]
    assert prefix_signature(engine, head_only) == prefix_signature(engine, Variant("fp"))
    plain = run_sweep(loaded, corpus, [head_only], MEASURE, engine=engine, progress=False, prefix_cache=False)
    cached = run_sweep(loaded, corpus, [head_only], MEASURE, engine=engine, progress=False)
    np.testing.assert_allclose(per_token(cached), per_token(plain), rtol=0, atol=1e-6)
    assert cached.prefix_stats["layers_run"] == n * cached.prefix_stats["hits"]  # fp ran, head_only replayed all


def test_hand_written_loop_with_lru_budget_and_with_a_plan(tiny_model, corpus):
    loaded = tiny_model("qwen2")
    engine = QuantEngine(loaded)
    variants = [Variant("fp"), Variant("all", INT4), Variant("all_again", INT4)]
    variants += [Variant(f"p{i}", INT4, ProtectionSpec(layers=(i,))) for i in range(4)]
    reference = corpus_scorer(loaded, corpus, MEASURE)
    expected = []
    for variant in variants:
        with engine.applied(variant):
            expected.append(reference.score_nll())
    scorer = corpus_scorer(loaded, corpus, MEASURE)
    one_boundary = sum(len(b) * len(b[0].ids) for b in scorer.batches) * loaded.model.config.hidden_size * 4
    cache = scorer.enable_prefix_cache(budget_bytes=int(2.5 * one_boundary))  # LRU, about 2 boundaries
    for variant, want in zip(variants, expected):
        with engine.applied(variant):
            got = scorer.score_nll(prefix=engine)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert cache.nbytes <= cache.budget_bytes
    assert cache.stats["evicted"] > 0 and cache.stats["hits"] > 0  # all_again: the latest batches

    # the same loop with a plan: only what later variants start from is kept
    cache.clear()
    cache.budget_bytes = 1 << 30
    cache.stats.clear()
    signatures = [prefix_signature(engine, v) for v in variants]
    assert cache.plan(signatures) == [0, 0, 4, 1, 1, 2, 3]
    for variant, want in zip(variants, expected):
        with engine.applied(variant):
            got = scorer.score_nll(prefix=engine)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert cache.stats["layers_skipped"] == (4 + 1 + 1 + 2 + 3) * len(scorer.batches)
    assert len(cache) == 0  # every entry released after its last consumer
    frame = scorer.score(prefix="a column, as before")  # not a prefix: a constant column
    assert set(frame["prefix"]) == {"a column, as before"}


def test_zero_budget_reuses_nothing(tiny_model, corpus):
    loaded = tiny_model("opt")
    variants = [Variant("all", INT4), Variant("p2", INT4, ProtectionSpec(layers=(2,)))]
    plain = run_sweep(loaded, corpus, variants, MEASURE, progress=False, prefix_cache=False)
    cached = run_sweep(loaded, corpus, variants, MEASURE, progress=False, prefix_cache=0)
    np.testing.assert_allclose(per_token(cached), per_token(plain), rtol=0, atol=1e-6)
    assert cached.prefix_stats["layers_skipped"] == 0 and cached.prefix_stats["skipped"] > 0


def test_short_budget_keeps_the_most_valuable_boundaries(tiny_model, corpus):
    loaded = tiny_model("llama")
    scorer = corpus_scorer(loaded, corpus, MEASURE)
    one_boundary = sum(len(b) * len(b[0].ids) for b in scorer.batches) * loaded.model.config.hidden_size * 4
    variants = [Variant("all", INT4)] + [Variant(f"p{i}", INT4, ProtectionSpec(layers=(i,))) for i in range(4)]
    result = run_sweep(loaded, corpus, variants, scorer=scorer, progress=False, prefix_cache=int(one_boundary * 1.01))
    # room for one boundary: the deepest one that a later variant needs (layer 3's input, for p3)
    assert result.prefix_stats["layers_skipped"] == 3 * len(scorer.batches)


def test_guard_disables_the_cache_when_something_runs_between_layers(tiny_model, corpus):
    loaded = tiny_model("gpt2", fresh=True)
    variants = [Variant("all", INT4), Variant("p2", INT4, ProtectionSpec(layers=(2,)))]
    plain = run_sweep(loaded, corpus, variants, MEASURE, progress=False, prefix_cache=False)
    layer = decoder_layers(loaded.model)[2]
    handle = layer.register_forward_pre_hook(lambda module, args: (args[0] * 1.0, *args[1:]))
    calls = []
    counter = decoder_layers(loaded.model)[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    scorer = corpus_scorer(loaded, corpus, MEASURE)
    try:
        with pytest.warns(RuntimeWarning, match="prefix cache disabled: the input of decoder layer 2"):
            cached = run_sweep(loaded, corpus, variants, scorer=scorer, progress=False)
    finally:
        handle.remove()
        counter.remove()
    np.testing.assert_allclose(per_token(cached), per_token(plain), rtol=0, atol=1e-6)
    assert cached.prefix_stats["disabled"] and cached.prefix_stats["layers_skipped"] == 0
    # only the batch that tripped the guard ran twice
    assert len(calls) == 3 * len(scorer.batches) + 1


def test_unsupported_architecture_never_caches(tiny_model, corpus, monkeypatch):
    loaded = tiny_model("bloom")
    monkeypatch.setattr(prefix_mod, "UNSUPPORTED_ARCHS", {"bloom"})
    result = run_sweep(loaded, corpus, [Variant("all", INT4), Variant("p3", INT4, ProtectionSpec(layers=(3,)))],
                       MEASURE, progress=False)
    assert result.prefix_stats.get("hits", 0) == 0 and result.prefix_stats.get("captured", 0) == 0


def test_stubs_are_removed_when_a_replayed_forward_fails(tiny_model, corpus):
    loaded = tiny_model("llama", fresh=True)
    engine = QuantEngine(loaded)
    scorer = corpus_scorer(loaded, corpus, MEASURE)
    with engine.applied(Variant("all", INT4)):
        scorer.score_nll(prefix=engine)
    layers = decoder_layers(loaded.model)

    def boom(module, args):
        raise RuntimeError("boom")

    handle = layers[3].register_forward_pre_hook(boom)
    hooks = hook_counts(loaded.model)
    try:
        with engine.applied(Variant("p3", INT4, ProtectionSpec(layers=(3,)))), pytest.raises(RuntimeError, match="boom"):
            scorer.score_nll(prefix=engine)  # layers 0..2 are stubbed when layer 3 raises
    finally:
        handle.remove()
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert len(hooks) == len(hook_counts(loaded.model))
    assert hook_counts(loaded.model) == [(f, p - (1 if m is layers[3] else 0)) for (f, p), m in zip(hooks, loaded.model.modules())]


def test_signature_of_another_model_is_refused(tiny_model, corpus):
    a, b = tiny_model("gpt2"), tiny_model("gpt2", seed=1)
    scorer = corpus_scorer(a, corpus, MEASURE)
    with pytest.raises(Exception, match="another model"):
        scorer.score_nll(prefix=prefix_signature(QuantEngine(b)))
    assert isinstance(prefix_signature(QuantEngine(a)), PrefixSignature)


# ----------------------------------------------------------------------------- OOM and batch sizing


class _FakeOOMOnce:
    def __init__(self) -> None:
        self.fired = 0

    def __call__(self, module, args):
        if not self.fired:
            self.fired += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")


@pytest.mark.parametrize("use_prefix", [False, True])
def test_fake_oom_halves_the_batch_budget_and_retries(tiny_model, corpus, use_prefix):
    loaded = tiny_model("gpt2", fresh=True)
    engine = QuantEngine(loaded)
    variant = Variant("p1", INT4, ProtectionSpec(layers=(1,)))
    reference = corpus_scorer(loaded, corpus, MeasureConfig(batch_tokens=200))
    scorer = corpus_scorer(loaded, corpus, MeasureConfig(batch_tokens=200))
    n_batches = len(scorer.batches)
    with engine.applied(Variant("all", INT4)):
        if use_prefix:
            scorer.score_nll(prefix=engine)  # fill the cache: the retry must not reuse stale batches
    with engine.applied(variant):
        expected = reference.score_nll()
        fake = _FakeOOMOnce()
        handle = decoder_layers(loaded.model)[2].register_forward_pre_hook(fake)
        try:
            with pytest.warns(RuntimeWarning, match="halving the batch token budget to 100"):
                got = scorer.score_nll(prefix=engine if use_prefix else None)
        finally:
            handle.remove()
    assert fake.fired == 1
    assert scorer.config.batch_tokens == 100 and len(scorer.batches) > n_batches
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(loaded.model))


def test_oom_with_single_window_batches_is_raised(tiny_model, corpus):
    loaded = tiny_model("gpt2", fresh=True)
    scorer = corpus_scorer(loaded, corpus, MeasureConfig(max_batch=1))
    handle = decoder_layers(loaded.model)[0].register_forward_pre_hook(_FakeOOMOnce())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(torch.cuda.OutOfMemoryError):
                scorer.score_nll()
    finally:
        handle.remove()


def test_auto_batch_tokens_from_free_memory(tiny_model, monkeypatch):
    from qhelpers.measure import scoring as measure

    loaded = tiny_model("llama")
    model = loaded.model
    per_token = measure.activation_bytes_per_token(model, 256)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    tokens = auto_batch_tokens(model, 256, 64, torch.device("cpu"))
    assert tokens == 64 * 256  # plenty of memory: the cap (max_batch windows of max_length)
    free = 2 * measure.logits_bytes(model) + 5000 * per_token
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    tokens = auto_batch_tokens(model, 256, 64, torch.device("cpu"), fraction=0.5)
    expected = int((0.5 * free - measure.logits_bytes(model)) // per_token)
    assert tokens == expected - expected % 64 and tokens % 64 == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    assert auto_batch_tokens(model, 256, 64, torch.device("cpu")) == 256  # at least one window


def test_cpu_batch_budget_unchanged(tiny_model):
    scorer = Scorer(tiny_model("gpt2"), texts=["Hello there, world."])
    assert scorer.config.batch_tokens == 2048


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bloom"])
def test_cached_sweep_equals_uncached_on_cuda(arch, corpus):
    from qhelpers.models.loading import load_model

    loaded = load_model(f"tiny:{arch}", device="cuda", dtype="fp32")
    variants = sweep_variants(loaded.n_layers)
    scorer = corpus_scorer(loaded, corpus, MEASURE)
    plain = run_sweep(loaded, corpus, variants, scorer=scorer, progress=False, prefix_cache=False)
    cached = run_sweep(loaded, corpus, variants, scorer=scorer, progress=False)
    np.testing.assert_array_less(np.abs(per_token(plain) - per_token(cached)), 1e-5)
    assert cached.prefix_stats["layers_skipped"] > 0
    auto = corpus_scorer(loaded, corpus)
    assert auto.config.batch_tokens >= auto.config.max_length


def test_prefix_caching_combines_with_the_compiled_path(tiny_model, corpus):
    """Regional compilation (MeasureConfig(compile=True)) keeps prefix caching: the session's hooks sit
    on the decoder layers, outside each layer's compiled graph, and replayed layers keep their stubs. A
    cached compiled sweep with a resident engine equals the uncached compiled sweep and the eager one
    (fp32, 1e-5 nats per token), skips layers, runs every batch with compiled layers and recompiles
    nothing when the engine swaps weights."""
    loaded = tiny_model("llama", fresh=True)
    variants = sweep_variants(loaded.n_layers)[:5]
    engine = QuantEngine(loaded, resident=True)
    eager = run_sweep(loaded, corpus, variants, MEASURE, engine=engine, progress=False, prefix_cache=False)
    scorer = corpus_scorer(loaded, corpus, replace(MEASURE, compile=True))
    plain = run_sweep(loaded, corpus, variants, engine=engine, scorer=scorer, progress=False, prefix_cache=False)
    calls = dict(scorer.compiled.calls)
    cached = run_sweep(loaded, corpus, variants, engine=engine, scorer=scorer, progress=False)
    np.testing.assert_array_less(np.abs(per_token(plain) - per_token(cached)), 1e-5)
    np.testing.assert_array_less(np.abs(per_token(eager) - per_token(cached)), 1e-5)
    assert cached.prefix_stats["disabled"] is None and cached.prefix_stats["layers_skipped"] > 0
    assert calls["eager"] == 0 and calls["recompiled"] == 0
    ran = {k: v - calls[k] for k, v in scorer.compiled.calls.items()}
    assert ran["eager"] == 0 and ran["recompiled"] == 0 and ran["partial"] > 0  # replays stub some layers
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(loaded.model))
