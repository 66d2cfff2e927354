"""qhelpers.measure.sweep_cache: a hit returns bit-identical scores; anything the scores depend on changes the key."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from qhelpers.measure.criticality import criticality_variants, layer_criticality
from qhelpers.measure.scoring import MeasureConfig
from qhelpers.measure.sweep_cache import cached_sweep, default_sweep_cache, sweep_key
from qhelpers.models.loading import load_model
from qhelpers.text.corpora import Corpus, load_corpus


@pytest.fixture(scope="module")
def setup():
    loaded = load_model("tiny:gpt2", device="cpu")
    corpus = load_corpus("udhr", langs=["en", "sw"], n_texts=2)
    return loaded, corpus, criticality_variants(loaded.n_layers, layers=[0])


def test_hit_is_bit_identical_and_skips_the_forward(setup, tmp_path, monkeypatch):
    loaded, corpus, variants = setup
    first, hit1 = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
    assert not hit1 and len(list(tmp_path.glob("*.json"))) == 1
    calls = []
    monkeypatch.setattr("qhelpers.measure.sweep_cache.run_sweep", lambda *a, **k: calls.append(1))
    second, hit2 = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
    assert hit2 and not calls
    pd.testing.assert_frame_equal(first.scores, second.scores, check_exact=True)
    pd.testing.assert_frame_equal(first.overhead, second.overhead, check_exact=True)
    assert list(second.variants) == list(first.variants) and second.run_order == first.run_order


def test_key_changes_with_weights_texts_variants_and_measure(setup):
    loaded, corpus, variants = setup
    key = sweep_key(loaded, corpus, variants, MeasureConfig())
    assert key == sweep_key(loaded, corpus, variants, MeasureConfig())
    assert key != sweep_key(loaded, corpus, variants, MeasureConfig(max_length=64))
    assert key != sweep_key(loaded, corpus, criticality_variants(loaded.n_layers, layers=[1]), MeasureConfig())
    other = Corpus.from_texts("other", {"en": ["a different text"], "sw": ["maandishi mengine"]})
    assert key != sweep_key(loaded, other, variants, MeasureConfig())
    param = next(loaded.model.parameters())
    with torch.no_grad():
        param[0, 0] += 1.0
    try:
        assert key != sweep_key(loaded, corpus, variants, MeasureConfig())
    finally:
        with torch.no_grad():
            param[0, 0] -= 1.0


def test_cache_off_writes_nothing_and_default_folder_follows_env(setup, tmp_path, monkeypatch):
    loaded, corpus, variants = setup
    monkeypatch.delenv("QHELPERS_SWEEP_CACHE", raising=False)  # conftest points it at a fresh folder
    monkeypatch.setenv("QHELPERS_CACHE", str(tmp_path))
    assert default_sweep_cache() == tmp_path / "sweeps"
    monkeypatch.setenv("QHELPERS_SWEEP_CACHE", str(tmp_path / "own"))
    assert default_sweep_cache() == tmp_path / "own"  # the sweep cache's own folder comes first
    monkeypatch.delenv("QHELPERS_SWEEP_CACHE")
    _, hit = cached_sweep(loaded, corpus, variants, cache=False, progress=False)
    assert not hit and not (tmp_path / "sweeps").exists()


def test_criticality_reports_reuse(setup, tmp_path):
    loaded, corpus, _ = setup
    a = layer_criticality(loaded, corpus, layers=[0], n_boot=20, cache=tmp_path, progress=False, allow_collapsed=True)
    b = layer_criticality(loaded, corpus, layers=[0], n_boot=20, cache=tmp_path, progress=False, allow_collapsed=True)
    assert (a.from_cache, b.from_cache) == (False, True)
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)


def test_concurrent_callers_compute_a_key_once(setup, tmp_path, monkeypatch, capsys):
    """Two callers of the same key at once: one computes, the other waits and gets a hit."""
    import threading
    import time

    loaded, corpus, variants = setup
    real, _ = cached_sweep(loaded, corpus, variants, cache=False, progress=False)
    calls = []

    def slow_sweep(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other caller to find no entry yet
        return real

    monkeypatch.setattr("qhelpers.measure.sweep_cache.run_sweep", slow_sweep)
    hits: list[bool] = []
    start = threading.Barrier(2)

    def call():
        start.wait()
        result, hit = cached_sweep(loaded, corpus, variants, cache=tmp_path, progress=False)
        pd.testing.assert_frame_equal(result.scores, real.scores, check_exact=True)
        hits.append(hit)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1, "both callers computed the sweep"
    assert sorted(hits) == [False, True]
    assert "another process is computing this sweep; waiting" in capsys.readouterr().out
