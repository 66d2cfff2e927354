"""Converted-model cache: the hashing of a conversion's files is skipped while a stamp shows them
unchanged since a full check, never when they changed; and the loader's non-finite check.

A tiny llama saved as a fake ``embedded:smollm2-135m`` conversion stands in for the real model (the
checks do not depend on the weights); one slow test loads the real SmolLM2 both ways."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from qhelpers.models import cache, loading
from qhelpers.util.errors import ModelLoadError
from tests.model_support import fake_conversion

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def hashes(monkeypatch):
    """Counts the files hashed by the full check."""
    calls: list[str] = []
    real = loading.file_sha256

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(loading, "file_sha256", counting)
    monkeypatch.delenv(cache.FULL_VERIFY_ENV, raising=False)
    return calls


@pytest.fixture
def no_racy_window(monkeypatch):
    """Files written by the test count as settled at once (else they are stamped only 3 s later)."""
    monkeypatch.setattr(cache, "RACY_SECONDS", 0.0)


def _load(root: Path):
    return loading.load_model("embedded:smollm2-135m", device="cpu", cache_dir=root)


def _assert_same_model(loaded, reference: nn.Module) -> None:
    got, want = loaded.model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_second_load_skips_hashing_and_gives_the_same_model(tmp_path, tiny_model, hashes, no_racy_window):
    folder, reference = fake_conversion(tmp_path, tiny_model)
    first = _load(tmp_path)
    assert "model.safetensors" in hashes  # the first load checks every file in full
    assert (folder / cache.STAMP_FILE).is_file()
    hashes.clear()
    second = _load(tmp_path)
    assert hashes == []
    _assert_same_model(first, reference)
    _assert_same_model(second, reference)
    assert second.metadata["source"] == "embedded" and second.metadata["cache_dir"] == str(folder)
    assert second.metadata["model_type"] == "llama" and second.metadata["n_layers"] == 4
    # The stamp is hidden: a folder's file listing (and its runner fingerprint) leaves it out.
    assert cache.STAMP_FILE.startswith(".")


def test_a_file_changed_after_the_stamp_is_hashed_again(tmp_path, tiny_model, hashes, no_racy_window):
    folder, reference = fake_conversion(tmp_path, tiny_model)
    _load(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    st = weights.stat()

    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError, match=r"model.safetensors has .* bytes.*truncated"):
        _load(tmp_path)

    # Same size, modification time set back to the stamped one: the change time still differs.
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelLoadError, match="does not match the sha256"):
        _load(tmp_path)

    weights.write_bytes(data)  # repaired: hashed once more, stamped, then trusted again
    hashes.clear()
    _assert_same_model(_load(tmp_path), reference)
    assert "model.safetensors" in hashes
    hashes.clear()
    _load(tmp_path)
    assert hashes == []


def test_changed_metadata_voids_the_stamp(tmp_path, tiny_model, hashes, no_racy_window):
    folder, _ = fake_conversion(tmp_path, tiny_model)
    _load(tmp_path)
    meta_path = folder / "qhelpers_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["config.json"]["sha256"] = "0" * 64  # e.g. a reconversion with other content
    meta_path.write_text(json.dumps(meta))
    hashes.clear()
    with pytest.raises(ModelLoadError, match="config.json does not match the sha256"):
        _load(tmp_path)


def test_recently_written_files_are_not_stamped(tmp_path, tiny_model, hashes):
    folder, _ = fake_conversion(tmp_path, tiny_model)
    _load(tmp_path)
    assert not (folder / cache.STAMP_FILE).exists()  # written < 3 s ago: a rewrite could keep its times
    hashes.clear()
    _load(tmp_path)
    assert "model.safetensors" in hashes


def test_full_verify_env_hashes_on_every_load(tmp_path, tiny_model, hashes, no_racy_window, monkeypatch):
    folder, _ = fake_conversion(tmp_path, tiny_model)
    _load(tmp_path)
    assert (folder / cache.STAMP_FILE).is_file()
    monkeypatch.setenv(cache.FULL_VERIFY_ENV, "1")
    for _ in range(2):
        hashes.clear()
        _load(tmp_path)
        assert "model.safetensors" in hashes


def test_loading_the_conversion_by_path_uses_the_stamp(tmp_path, tiny_model, hashes, no_racy_window):
    folder, reference = fake_conversion(tmp_path, tiny_model)
    loading.load_model(str(folder), device="cpu")
    hashes.clear()
    local = loading.load_model(str(folder), device="cpu")
    assert hashes == []
    _assert_same_model(local, reference)
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(ModelLoadError, match="damaged"):
        loading.load_model(str(folder), device="cpu")


def test_corrupt_stamp_means_a_full_check(tmp_path, tiny_model, hashes, no_racy_window):
    folder, reference = fake_conversion(tmp_path, tiny_model)
    _load(tmp_path)
    stamp = folder / cache.STAMP_FILE
    stamp.write_text(stamp.read_text()[:20])  # truncated JSON
    hashes.clear()
    _assert_same_model(_load(tmp_path), reference)
    assert "model.safetensors" in hashes
    assert json.loads(stamp.read_text())["format"] == 1  # rewritten whole


# ----------------------------------------------------------------------------- non-finite check


def _elementwise(model: nn.Module) -> str | None:
    """The definition: the first floating-point parameter with a NaN or an infinity."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            return name
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_check_matches_the_elementwise_definition(dtype):
    big = torch.finfo(dtype).max
    cases = {
        "finite": [0.5, -2.0, 3.0],
        "sum overflows, values finite": [big, big, big * 0.5],
        "sum cancels to finite": [big, -big, 1.0],
        "nan": [1.0, float("nan"), 2.0],
        "+inf": [1.0, float("inf")],
        "-inf": [float("-inf"), 1.0],
        "inf and -inf": [float("inf"), float("-inf")],
        "empty": [],
    }
    for label, values in cases.items():
        model = nn.Module()
        model.a = nn.Parameter(torch.ones(4, dtype=dtype))
        model.b = nn.Parameter(torch.tensor(values, dtype=dtype))
        model.c = nn.Parameter(torch.ones(2, dtype=dtype))
        expected = _elementwise(model)
        assert loading._first_nonfinite_parameter(model) == expected, label
        assert (expected == "b") == (label in ("nan", "+inf", "-inf", "inf and -inf")), label


def test_nonfinite_weights_still_fail_the_load(tmp_path, tiny_model, no_racy_window):
    from safetensors.torch import load_file, save_file

    folder, _ = fake_conversion(tmp_path, tiny_model)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[5]
    state[name][0, 0] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    meta_path = folder / "qhelpers_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.safetensors"] = {"size": weights.stat().st_size,
                                          "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=rf"non-finite weights .* {name!r}"):
        _load(tmp_path)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_embedded_smollm_stamped_load_equals_full_check(embedded_smollm, qhelpers_cache_dir, monkeypatch):
    """The real SmolLM2 loaded through the stamp equals a load that hashes every file."""
    monkeypatch.setenv(cache.FULL_VERIFY_ENV, "1")
    full = loading.load_model("embedded:smollm2-135m", device="cpu", cache_dir=qhelpers_cache_dir)
    monkeypatch.delenv(cache.FULL_VERIFY_ENV)
    loading.load_model("embedded:smollm2-135m", device="cpu", cache_dir=qhelpers_cache_dir)  # stamps
    fast = loading.load_model("embedded:smollm2-135m", device="cpu", cache_dir=qhelpers_cache_dir)
    _assert_same_model(fast, full.model)
    assert fast.metadata == full.metadata
