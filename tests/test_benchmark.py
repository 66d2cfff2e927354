"""Smoke run of benchmarks/sweep_benchmark.py on a tiny model (2 texts per language)."""
from __future__ import annotations

import json
import statistics

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("sweep_benchmark")


def test_benchmark_smoke_run(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main([
        "--model", "tiny:gpt2", "--device", "cpu", "--n-texts", "2", "--layers", "0,3",
        "--max-length", "32", "--truncate", "--floor-repeats", "1", "--out", str(out),
        "--peak-tflops", "0.5",  # no default peak on CPU: MFU columns only with one given
    ])
    printed = capsys.readouterr().out
    for way in ("floor", "floor-b1", "hf-floor", "seed", "engine", "engine+prefix"):
        assert way in report["rows"] and f"\n{way} " in printed
    assert "engine+compile" not in report["rows"]  # not by default on CPU (compiling takes minutes)
    assert report["header"]["configs"] == 4 and report["header"]["texts"] == 14
    rows = report["rows"]
    # the three ways score the same tokens and agree (fp32: batching rounding only)
    assert rows["engine"]["max_abs_diff_lang_nll_vs_seed"] < 1e-4
    assert rows["engine+prefix"]["max_abs_diff_lang_nll_vs_engine"] < 1e-5
    assert rows["engine+prefix"]["run_order"][:2] == ["fp", "all_quantized"]
    assert report["prefix_stats"]["layers_skipped"] > 0
    for way in ("engine", "engine+prefix"):  # per-configuration seconds, inside the way's wall time
        assert list(rows[way]["config_s"]) == ["fp", "all_quantized", "protect_L0", "protect_L3"]
        assert 0 < sum(rows[way]["config_s"].values()) <= rows[way]["wall_s"]
    assert set(report["targets"]) >= {"engine >= 2x faster than seed", "engine overhead <= 10 % (prefix off)"}
    flops = report["flops"]
    assert flops["flops_per_config_with_head"] == flops["flops_per_config"] + flops["head_flops"]
    assert flops["head_flops"] == 2.0 * 50257 * 64 * flops["tokens"]  # tiny:gpt2: V x d per token
    configs = report["header"]["configs"]
    for row in rows.values():
        assert row["tokens_per_s"] == pytest.approx(configs * flops["tokens"] / row["wall_s"])
        assert row["mfu_pct"] == pytest.approx(100 * configs * flops["flops_per_config"] / row["wall_s"] / 0.5e12)
        assert row["mfu_with_head_pct"] == pytest.approx(
            100 * configs * flops["flops_per_config_with_head"] / row["wall_s"] / 0.5e12)
    assert report["floor_mfu_with_head_pct"] == rows["hf-floor"]["mfu_with_head_pct"]
    assert report["engine_over_hf_floor_time"] == rows["engine"]["wall_s"] / rows["hf-floor"]["wall_s"]
    header = report["header"]
    assert header["attn_implementation"] == "sdpa" and header["max_batch"] == 64
    assert {"device_name", "date", "git_commit"} <= set(header)
    saved = json.loads(out.read_text())
    assert saved["rows"].keys() == rows.keys()


def test_layer_selection_and_random_model_specs(bench):
    assert bench.pick_layers(None, 4) == [0, 1, 2, 3]
    assert bench.pick_layers("every:10", 30) == [0, 10, 20]
    assert bench.pick_layers("n:4", 30) == [0, 10, 19, 29]
    assert bench.pick_layers("0,-1", 30) == [0, 29]
    assert set(bench.RANDOM_MODELS) == {"gpt2-small-random", "opt-125m-random"}
    variants = bench.make_variants(12, list(range(12)), bench.QuantConfig())
    assert len(variants) == 14 and list(variants)[:2] == ["fp", "all_quantized"]


def test_engine_apply_benchmark_counts_the_work_a_kept_variant_saves(load_benchmark, tmp_path):
    """benchmarks/engine_apply_benchmark.py on tiny:llama: without kept tensors every apply dispatches the
    dequantization of each quantized matrix; with them, none (views only)."""
    bench = load_benchmark("engine_apply_benchmark")
    out = tmp_path / "apply.json"
    result = bench.main(["--model", "tiny:llama", "--device", "cpu", "--layers", "n:2", "--repeats", "1",
                         "--out", str(out)])
    assert json.loads(out.read_text())["variants"] == result["variants"] == 4  # fp, all, 2 protected
    off, kept = result["dense_off"], result["dense_kept"]
    assert off["ops_per_apply_max"] >= 2 * 14  # tiny llama: 2 layers x 7 matrices, >= 2 ops each
    assert kept["ops_per_apply_max"] == 0 and kept["views_per_apply_max"] > 0
    assert kept["dense_bytes"] > 0 and off["dense_bytes"] == 0


def test_autoround_benchmark_times_and_compares_devices(load_benchmark, tmp_path):
    """benchmarks/autoround_benchmark.py on tiny:llama: each device's seconds and profile; 'model' on a CPU
    model is the CPU run, so the two runs' weights agree exactly (a known answer for the comparison)."""
    bench = load_benchmark("autoround_benchmark")
    out = tmp_path / "ar.json"
    result = bench.main(["--model", "tiny:llama", "--model-device", "cpu", "--devices", "cpu,model", "--top", "4",
                         "--commit", "abc123", "--out", str(out)])
    assert json.loads(out.read_text())["runs"].keys() == result["runs"].keys() == {"cpu", "model"}
    for run in result["runs"].values():
        assert run["seconds"] > 0 and "ncalls" in run["profile_top"][0] and len(run["profile_top"]) == 5
    assert result["max_abs_weight_diff_cpu_vs_model"] == 0.0
    assert result["environment"]["git"]["commit"] == "abc123" and result["gc_frozen_at_start"] >= 0


@pytest.mark.slow
def test_compiled_floor_is_sampled_between_the_ways_too(bench, tmp_path):
    """The compiled floor's passes right after compiling ran slower than later ones (CPU and H100), so it
    is sampled beside every later eager floor sample and reported as the median of all (~25 s: it compiles)."""
    report = bench.main([
        "--model", "tiny:gpt2", "--device", "cpu", "--n-texts", "2", "--layers", "0,3", "--max-length", "32",
        "--truncate", "--floor-repeats", "4", "--ways", "engine,engine+compile", "--out", str(tmp_path / "b.json"),
        "--peak-tflops", "0.5",  # MFU columns, so that only the corpus decides whether the MFU target is judged
    ])
    rows, configs = report["rows"], report["header"]["configs"]
    compiled = rows["floor-compile"]["measured_wall_s"]
    # 2 passes after compiling, then one beside each of the 2 eager samples that follow the ways
    assert len(compiled) == 4 and len(rows["floor"]["measured_wall_s"]) == 3
    assert rows["floor-compile"]["wall_s"] == pytest.approx(statistics.median(compiled) * configs)
    assert "mfu_with_head_pct" in rows["floor-compile"]
    assert "compiled floor >= 20 % MFU with the LM head (full corpus)" not in report["targets"]  # seed languages
    assert "engine+compile within 10 % of the compiled floor" in report["targets"]
