"""The README's error table, row by row: each bad input raises an error that names the
problem and the fix. (run_all.py's rows are in tests/test_runner.py.)"""
from __future__ import annotations

import pytest
import torch

from qhelpers.measure.scoring import Scorer
from qhelpers.models.archs import get_arch
from qhelpers.models.loading import load_model
from qhelpers.quant.engine import QuantEngine, Variant
from qhelpers.quant.protection import ProtectionSpec, resolve_plan
from qhelpers.quant.quantizers import QuantConfig, quantize
from qhelpers.text.corpora import Corpus, load_corpus
from qhelpers.util.errors import (
    ConfigError,
    CorpusError,
    MeasurementError,
    ModelLoadError,
    UnknownArchitectureError,
)


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny:gpt2", device="cpu")


def test_unknown_architecture():
    with pytest.raises(UnknownArchitectureError, match=r"unknown architecture 'mamba'.*Supported: .*gpt2.*register_architecture"):
        get_arch("mamba")


def test_layer_index_out_of_range(gpt2):
    with pytest.raises(ConfigError, match=r"layer index 12 is out of range: this model has 4 decoder layers \(valid: 0..3"):
        resolve_plan(gpt2.model, ProtectionSpec(layers=(12,)))


def test_component_the_architecture_lacks(gpt2):
    with pytest.raises(ConfigError, match=r"gpt2 has no 'mlp_gate'.*available components: .*mlp_in"):
        resolve_plan(gpt2.model, ProtectionSpec(components=("L0.mlp_gate",)))


def test_unknown_component_and_bare_string():
    with pytest.raises(ConfigError, match=r"unknown component 'atn'; valid names: .*attn"):
        ProtectionSpec(components=("atn",))
    with pytest.raises(ConfigError, match=r"pass a list of name substrings like \['h.0.'\]"):
        ProtectionSpec.from_any("h.0.")


def test_pattern_matching_nothing(gpt2):
    with pytest.raises(ConfigError, match=r"'model.layers.0.' matches no parameter .* names look like 'transformer"):
        resolve_plan(gpt2.model, ["model.layers.0."])


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_2_to_8(bits):
    with pytest.raises(ConfigError, match="bits must be between 2 and 8"):
        QuantConfig(bits=bits)


def test_group_size_that_does_not_divide_uses_a_partial_last_group():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, 7.0]])  # 5 inputs, groups of 2: [1,-2] [3,0.5] [7]
    q = quantize(w, QuantConfig(bits=4, granularity="group", group_size=2))
    assert torch.allclose(q.dequantize()[0, 4], torch.tensor(7.0))  # the lone last group keeps its own scale


def test_empty_text(gpt2):
    with pytest.raises(MeasurementError, match="empty or whitespace-only"):
        Scorer(gpt2, texts=["   \n"])
    with pytest.raises(CorpusError, match="empty"):
        Corpus.from_texts("mine", {"en": ["fine", "  "]})


def test_language_with_no_texts_unknown_corpus_unknown_language():
    with pytest.raises(CorpusError, match="has no texts"):
        Corpus.from_texts("mine", {"en": ["a text"], "he": []})
    with pytest.raises(CorpusError, match=r"Unknown corpus 'wiki'. Available corpora: udhr"):
        load_corpus("wiki")
    with pytest.raises(CorpusError, match=r"'xx'.*(en|udhr)"):
        load_corpus("udhr", langs=["en", "xx"])
    with pytest.raises(CorpusError, match=r"'fr'.*udhr"):
        load_corpus("seed-exp032", langs=["fr"])


def test_mismatched_parallel_alignment():
    with pytest.raises(CorpusError, match=r"parallel but languages 'en' .* and 'he' .* have different ids"):
        Corpus(name="bad", texts={"en": ("a", "b"), "he": ("c", "d")}, ids={"en": ("p1", "p2"), "he": ("p1", "p3")},
               parallel=True, source="test", licence="none")


def test_nan_weights(tmp_path):
    loaded = load_model("tiny:llama", device="cpu")
    loaded.model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.up_proj.weight"):
        load_model(str(tmp_path))


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'gpt2'.*embedded:smollm2-135m"):
        load_model("gpt2")


def test_applying_a_variant_while_another_is_applied(gpt2):
    engine = QuantEngine(gpt2)
    with engine.applied(Variant("a", QuantConfig())):
        with pytest.raises(ConfigError, match="restore"):
            engine.apply(Variant("b", QuantConfig()))
