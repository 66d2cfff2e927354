"""The methods experiment's pieces: spec strings, variants, bits tables, calibration contrasts."""
from __future__ import annotations

import pandas as pd
import pytest

from qhelpers.experiments import quant_methods as qm
from qhelpers.models.loading import load_model
from qhelpers.quant.catalog import CATALOG, catalog_table, method_family, parse_method
from qhelpers.quant.engine import QuantEngine
from qhelpers.quant.quantizers import QuantConfig
from qhelpers.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED
from qhelpers.util.errors import ConfigError


def test_specs_parse_to_the_configs_they_name():
    assert parse_method("rtn:4") == QuantConfig(method="int", bits=4, granularity="channel")
    assert parse_method("rtn:3:g64") == QuantConfig(method="int", bits=3, granularity="group", group_size=64)
    assert parse_method("nf4") == QuantConfig(method="nf4")
    assert method_family("GGUF:Q4_K_M") == "gguf"
    for bad, match in (("rtn", "bit width"), ("rtn:x", "not an integer"), ("rtn:4:k3", "unknown option"),
                       ("nf4:2", "no options"), ("gptq:4", "GPTQ"), ("foo:4", "families"), ("", "non-empty")):
        with pytest.raises(ConfigError, match=match):
            parse_method(bad)
    from qhelpers.quant.gguf import GGUFPreset, GGUFType

    assert parse_method("gguf:Q4_K_M") == GGUFPreset("Q4_K_M") and parse_method("gguf:q4_k") == GGUFType("Q4_K")
    assert parse_method("gguf:Q4_0") == GGUFPreset("Q4_0") and parse_method("gguf:Q4_0:pure") == GGUFType("Q4_0")
    assert parse_method("gguf:Q3_K_M", calibration="sw") == GGUFPreset("Q3_K_M", calibration="sw")
    with pytest.raises(ConfigError, match="pure"):
        parse_method("gguf:Q4_K:fast")
    rows = catalog_table()
    assert [r["family"] for r in rows] == list(CATALOG) and all(r["version"] for r in rows)


def test_method_variants_validate_before_running():
    variants = qm.method_variants(["rtn:4", "nf4"])
    assert list(variants) == ["rtn:4", "nf4"] and variants["nf4"].quant == QuantConfig(method="nf4")
    with pytest.raises(ConfigError, match="repeats"):
        qm.method_variants(["rtn:4", "rtn:4"])
    with pytest.raises(ConfigError, match="non-empty list"):
        qm.method_variants("rtn:4")
    with pytest.raises(ConfigError, match="use no calibration"):
        qm.calibration_variants(["rtn:4"], ["en"])
    assert qm.check_bits_contrast(None, ["a"]) is None
    assert qm.check_bits_contrast(["a", "b"], ["a", "b", "c"]) == ("a", "b")
    with pytest.raises(ConfigError, match="BITS_CONTRAST"):
        qm.check_bits_contrast(["a", "z"], ["a", "b"])


def test_bits_table_and_damage_join():
    loaded = load_model("tiny:llama")
    variants = qm.method_variants(["rtn:4", "nf4"])
    bits = qm.bits_table(QuantEngine(loaded), variants)
    assert list(bits["config"]) == ["rtn:4", "nf4"] and bits.loc[1, "bits_per_weight"] == pytest.approx(4.5)
    assert bits.loc[0, "bits_per_weight"] > 4.0 and set(bits["calibration"]) == {"none"}
    table = pd.DataFrame({"config": ["rtn:4", "nf4"], "lang": ["en", "en"], "delta_bpb": [0.1, 0.2],
                          "delta_bpb_ci_low": [0.0, 0.1], "delta_bpb_ci_high": [0.2, 0.3]})
    data = qm.damage_vs_bits(table, bits)
    assert list(data["family"]) == ["rtn", "nf4"] and data.loc[1, "bits_per_weight"] == pytest.approx(4.5)
    with pytest.raises(ConfigError, match="kl_bpb"):
        qm.damage_vs_bits(table, bits, "kl_bpb")


def test_target_terms_and_the_all_languages_verdict():
    terms = qm.target_calibration_terms("awq:4", ["en", "sw", "he"])
    assert terms == {("awq:4@sw", "sw"): 0.5, ("awq:4@en", "sw"): -0.5, ("awq:4@he", "he"): 0.5, ("awq:4@en", "he"): -0.5}
    with pytest.raises(ConfigError, match="besides the reference"):
        qm.target_calibration_terms("awq:4", ["en"])
    assert qm.all_languages_verdict([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert qm.all_languages_verdict([SUPPORTED, INCONCLUSIVE]) == INCONCLUSIVE
    assert qm.all_languages_verdict([SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE]) == NOT_SUPPORTED
