"""LoRA adapters and the adapter zoo (qhelpers.experiments.lora.zoo).

Known answers: the LoRA formula computed by hand in float64 numpy from the base weights
(nn.Linear [out, in] and GPT-2 Conv1D [in, out]); the base model's own loss for the first
step (B = 0); PEFT's Kaiming-uniform bound 1/sqrt(in); hand-written PEFT key names; files
written by hand with safetensors for every malformed-zoo case.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_np

from qhelpers.experiments.lora import zoo as L
from qhelpers.models.archs import get_module
from qhelpers.text.corpora import load_corpus
from qhelpers.util.errors import ConfigError

TEXT_EN = (
    "All human beings are born free and equal in dignity and rights. They are endowed with "
    "reason and conscience and should act towards one another in a spirit of brotherhood."
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ----------------------------------------------------------------------------- configs


def test_lora_config_validation_names_field_and_valid_values():
    with pytest.raises(ConfigError, match=r"rank.*1\.\.256"):
        L.LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="rank"):
        L.LoraConfig(rank=257)
    with pytest.raises(ConfigError, match="alpha"):
        L.LoraConfig(alpha=0.0)
    with pytest.raises(ConfigError, match=r"unknown component.*'qq'.*valid targets: q, k, v, o"):
        L.LoraConfig(targets=("q", "qq"))
    with pytest.raises(ConfigError, match="layers"):
        L.LoraConfig(layers=("0",))
    cfg = L.LoraConfig(rank=8, alpha=16, targets=["q", "o"], layers=[0, -1])
    assert cfg.targets == ("q", "o") and cfg.layers == (0, -1) and cfg.scaling == 2.0
    assert L.LoraConfig(targets=("attn_qkv", "mlp")).components() == (
        "attn_q", "attn_k", "attn_v", "mlp_in", "mlp_gate", "mlp_out")
    for field, value in [("adapters_per_lang", 1), ("steps", 0), ("lr", -1.0), ("batch_size", 0),
                         ("max_length", 1), ("langs", ("en",)), ("langs", ("en", "en"))]:
        with pytest.raises(ConfigError, match=field):
            L.ZooConfig(**{field: value})


def test_resolve_targets_by_registry(tiny_model):
    gpt2 = tiny_model("gpt2")
    # q and v both live in the fused c_attn: one module per layer
    assert L.resolve_targets(gpt2, L.LoraConfig()) == [(i, f"transformer.h.{i}.attn.c_attn") for i in range(4)]
    # the "mlp" group skips the gate GPT-2 lacks; layers=-1 is the last layer
    assert L.resolve_targets(gpt2, L.LoraConfig(targets=("mlp",), layers=(-1,))) == [
        (3, "transformer.h.3.mlp.c_fc"), (3, "transformer.h.3.mlp.c_proj")]
    llama = tiny_model("llama")
    assert L.resolve_targets(llama, L.LoraConfig(layers=(1,))) == [
        (1, "model.layers.1.self_attn.q_proj"), (1, "model.layers.1.self_attn.v_proj")]
    with pytest.raises(ConfigError, match=r"LoraConfig.layers.*out of range.*4 decoder layers"):
        L.resolve_targets(gpt2, L.LoraConfig(layers=(4,)))
    with pytest.raises(ConfigError, match=r"gpt2 has no \['mlp_gate'\].*valid for this architecture"):
        L.resolve_targets(gpt2, L.LoraConfig(targets=("gate",)))


# ----------------------------------------------------------------------------- LoRA math


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_B_leaves_logits_exactly_equal(tiny_model, arch):
    loaded = tiny_model(arch)
    ids = torch.tensor([[50256, 464, 2068, 7586, 21831, 18045, 625, 262]])
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        with L.attach_lora(loaded, L.LoraConfig(targets=("linear",)), seed=3) as wrappers:
            assert all(float(w.lora_A.abs().max()) > 0 for w in wrappers.values())  # A is random
            wrapped = loaded.model(input_ids=ids).logits
    assert torch.equal(base, wrapped)
    assert not any(isinstance(m, L.LoraLinear) for m in loaded.model.modules())


@pytest.mark.parametrize(
    "arch, path, conv1d",
    [("gpt2", "transformer.h.1.attn.c_attn", True), ("llama", "model.layers.1.self_attn.v_proj", False),
     ("opt", "model.decoder.layers.1.self_attn.q_proj", False)],
)
def test_hand_set_lora_matches_formula(tiny_model, arch, path, conv1d):
    """Inside the running model, the wrapped module's output equals
    base(x) + (alpha/r) x A^T B^T, computed by hand in float64 from the base weight."""
    loaded = tiny_model(arch)
    lora = L.LoraConfig(rank=3, alpha=5.0, layers=(1,))
    module = get_module(loaded.model, path)
    W = module.weight.detach().double().numpy()
    bias = module.bias.detach().double().numpy() if module.bias is not None else 0.0
    n_in, n_out = (W.shape[0], W.shape[1]) if conv1d else (W.shape[1], W.shape[0])
    rng = np.random.default_rng(0)
    tensors = {}
    for _, p in L.resolve_targets(loaded, lora):
        m = get_module(loaded.model, p)
        i, o = (m.weight.shape[0], m.weight.shape[1]) if conv1d else (m.weight.shape[1], m.weight.shape[0])
        tensors[p] = (rng.normal(size=(3, i)).astype(np.float32), rng.normal(size=(o, 3)).astype(np.float32))
    A, B = (t.astype(np.float64) for t in tensors[path])
    assert A.shape == (3, n_in) and B.shape == (n_out, 3)
    seen = {}
    ids = torch.tensor([[50256, 464, 2068, 7586, 21831]])
    with torch.no_grad():
        base_logits = loaded.model(input_ids=ids).logits
        with L.attach_lora(loaded, lora, tensors) as wrappers:
            hook = wrappers[path].register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], y=out))
            logits = loaded.model(input_ids=ids).logits
            hook.remove()
    x = seen["x"].double().numpy().reshape(-1, n_in)
    base_out = x @ W + bias if conv1d else x @ W.T + bias
    expected = base_out + (5.0 / 3) * x @ A.T @ B.T
    np.testing.assert_allclose(seen["y"].double().numpy().reshape(-1, n_out), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base_logits, logits)  # the update reached the output


def test_lora_A_init_is_peft_kaiming_uniform(tiny_model):
    """PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in)): variance bound^2/3."""
    loaded = tiny_model("llama")
    with L.attach_lora(loaded, L.LoraConfig(rank=256, layers=(0,), targets=("q",)), seed=1) as wrappers:
        (w,) = wrappers.values()
        A = w.lora_A.detach().double().numpy()
        assert not w.lora_B.detach().any()
    bound = 1 / np.sqrt(64)
    assert A.shape == (256, 64)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.99 * bound
    assert abs(A.var() / (bound**2 / 3) - 1) < 0.05
    assert abs(A.mean()) < 0.01 * bound * 5


def test_attach_lora_restores_modules_on_error(tiny_model):
    loaded = tiny_model("gpt2")
    before = _state(loaded.model)
    with pytest.raises(RuntimeError, match="boom"):
        with L.attach_lora(loaded, L.LoraConfig()):
            raise RuntimeError("boom")
    assert type(get_module(loaded.model, "transformer.h.0.attn.c_attn")).__name__ == "Conv1D"
    _assert_same_state(loaded.model, before)
    with pytest.raises(ConfigError, match="exactly the modules"):
        with L.attach_lora(loaded, L.LoraConfig(), {"transformer.h.0.attn.c_attn": (np.zeros((4, 64)), np.zeros((192, 4)))}):
            pass


# ----------------------------------------------------------------------------- training


def test_training_lowers_loss_and_leaves_base_bit_identical(tiny_model):
    loaded = tiny_model("gpt2")
    before = _state(loaded.model)
    flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    out = L.train_adapter(loaded, [TEXT_EN], L.LoraConfig(), steps=10, lr=1e-2, batch_size=1, max_length=64, seed=0)
    assert len(out.losses) == 10
    assert np.mean(out.losses[-3:]) < out.losses[0]
    # step 0 runs with B = 0: its loss is the base model's own (Hugging Face) loss on the text
    ids = torch.tensor([[50256] + loaded.tokenizer(TEXT_EN)["input_ids"]])
    assert ids.shape[1] <= 64
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, labels=ids).loss.item()
    assert out.losses[0] == pytest.approx(ref, rel=1e-5)
    _assert_same_state(loaded.model, before)
    assert {n: p.requires_grad for n, p in loaded.model.named_parameters()} == flags
    assert all(p.grad is None for p in loaded.model.parameters())
    assert not loaded.model.training
    assert sorted(out.tensors) == [f"transformer.h.{i}.attn.c_attn" for i in range(4)]
    for A, B in out.tensors.values():
        assert A.shape == (4, 64) and B.shape == (192, 4) and A.dtype == torch.float32
        assert B.abs().max() > 0


def test_training_is_deterministic_given_seed(tiny_model):
    loaded = tiny_model("llama")
    texts = [TEXT_EN, TEXT_EN[:80], TEXT_EN[80:]]
    kw = dict(steps=3, lr=1e-2, batch_size=2, max_length=16, seed=7)
    a = L.train_adapter(loaded, texts, L.LoraConfig(), **kw)
    b = L.train_adapter(loaded, texts, L.LoraConfig(), **kw)
    c = L.train_adapter(loaded, texts, L.LoraConfig(), **(kw | {"seed": 8}))
    assert a.losses == b.losses
    for p in a.tensors:
        assert torch.equal(a.tensors[p][0], b.tensors[p][0]) and torch.equal(a.tensors[p][1], b.tensors[p][1])
    assert not torch.equal(a.tensors[p][0], c.tensors[p][0])


# ----------------------------------------------------------------------------- zoo round trip

ZOO_CFG = L.ZooConfig(langs=("en", "he"), adapters_per_lang=2, texts_per_adapter=2, steps=2, max_length=32, lr=1e-2)


@pytest.fixture(scope="module")
def built_zoo(tiny_model, tmp_path_factory):
    loaded = tiny_model("gpt2")
    corpus = load_corpus("udhr", langs=["en", "he"], n_texts=4, seed=0)
    root = tmp_path_factory.mktemp("zoo") / "z"
    zoo = L.build_zoo(loaded, corpus, root, ZOO_CFG, progress=False)
    return loaded, corpus, root, zoo


def test_zoo_round_trip_matches_train_adapter(built_zoo):
    loaded, corpus, root, zoo = built_zoo
    zoo = L.load_zoo(root)
    plan = L.zoo_plan(corpus, ZOO_CFG)
    assert [p.adapter for p in plan] == ["en_00", "en_01", "he_00", "he_01"]
    assert zoo.adapters == ["en_00", "en_01", "he_00", "he_01"] and zoo.classes == ["en", "he"]
    assert zoo.y().tolist() == [0, 0, 1, 1]
    mats = zoo.matrices()
    for item in plan:
        assert set(item.text_ids) <= set(corpus.ids[item.label]) and len(item.text_ids) == 2
    for i in (0, 3):  # one adapter per class is retrained by hand
        item = plan[i]
        again = L.train_adapter(loaded, item.texts, ZOO_CFG.lora, steps=2, lr=1e-2, batch_size=2, max_length=32,
                                seed=item.seed)
        for path, (A, B) in again.tensors.items():
            layer = int(path.split(".")[2])
            assert np.array_equal(mats[f"L{layer}.{path}.lora_A"][i], A.numpy())
            assert np.array_equal(mats[f"L{layer}.{path}.lora_B"][i], B.numpy())
        cfg = json.loads((root / item.adapter / "adapter_config.json").read_text())
        assert cfg["qhelpers"]["text_ids"] == list(item.text_ids) and cfg["qhelpers"]["label"] == item.label
        assert cfg["qhelpers"]["losses"] == again.losses
    # seeds differ between adapters: no two adapters are equal
    A0 = mats["L0.transformer.h.0.attn.c_attn.lora_A"]
    assert len({A0[i].tobytes() for i in range(4)}) == 4


def test_zoo_files_use_peft_naming(built_zoo):
    _, _, root, zoo = built_zoo
    with safe_open(str(root / "en_00" / "adapter_model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    expected = sorted(f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight" for i in range(4) for ab in "AB")
    assert keys == expected
    assert shapes["base_model.model.transformer.h.2.attn.c_attn.lora_A.weight"] == (4, 64)  # [r, in]
    assert shapes["base_model.model.transformer.h.2.attn.c_attn.lora_B.weight"] == (192, 4)  # [out, r]
    cfg = json.loads((root / "en_00" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["attn.c_attn"] and cfg["base_model_name_or_path"] == "tiny:gpt2"
    assert cfg["fan_in_fan_out"] is True
    rows = list(csv.reader((root / "labels.csv").open()))
    assert rows == [["adapter", "label"], ["en_00", "en"], ["en_01", "en"], ["he_00", "he"], ["he_01", "he"]]
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["model"] == "tiny:gpt2" and manifest["zoo_config"]["steps"] == 2 and manifest["created"]
    assert manifest["versions"]["torch"]
    # Zoo naming and ordering
    assert zoo.matrix_names()[:3] == ["L0.transformer.h.0.attn.c_attn.lora_A", "L0.transformer.h.0.attn.c_attn.lora_B",
                                      "L1.transformer.h.1.attn.c_attn.lora_A"]
    assert zoo.pairs()[3] == ("L3.transformer.h.3.attn.c_attn.lora_A", "L3.transformer.h.3.attn.c_attn.lora_B")
    assert zoo.layer_of("L2.transformer.h.2.attn.c_attn.lora_B") == 2
    with pytest.raises(ConfigError, match="not a matrix of this zoo"):
        zoo.layer_of("L9.nothing.lora_A")
    assert zoo.lora_config() == ZOO_CFG.lora
    assert "4 adapters (en: 2, he: 2)" in zoo.describe()


def test_adapter_applied_from_zoo_reproduces_trained_update(built_zoo):
    loaded, _, _, zoo = built_zoo
    ids = torch.tensor([[50256, 464, 2068]])
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
        with L.attach_lora(loaded, zoo.lora_config(), zoo.adapter_tensors("he_01")):
            adapted = loaded.model(input_ids=ids).logits
    assert not torch.equal(base, adapted)


def _mtimes(root: Path) -> dict[str, int]:
    return {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in root.iterdir() if p.is_dir()}


def test_build_zoo_resumes_and_refuses_other_settings(built_zoo, tmp_path):
    loaded, corpus, root0, _ = built_zoo
    root = tmp_path / "z"
    shutil.copytree(root0, root)
    before = _mtimes(root)
    L.build_zoo(loaded, corpus, root, ZOO_CFG, progress=False)
    assert _mtimes(root) == before
    assert json.loads((root / "zoo.json").read_text())["last_build"]["trained"] == 0
    old = L.load_zoo(root).matrices()
    shutil.rmtree(root / "he_00")
    zoo = L.build_zoo(loaded, corpus, root, ZOO_CFG, progress=False)
    after = _mtimes(root)
    assert {k: v for k, v in after.items() if k != "he_00"} == {k: v for k, v in before.items() if k != "he_00"}
    assert json.loads((root / "zoo.json").read_text())["last_build"] == {
        "trained": 1, "skipped": 3, "seconds": pytest.approx(0, abs=600)}
    for name, arr in zoo.matrices().items():  # the retrained adapter is identical (deterministic)
        assert np.array_equal(arr, old[name])
    other = L.ZooConfig(**{**ZOO_CFG.__dict__, "steps": 3})
    with pytest.raises(L.ZooError, match=r"different settings \(zoo_config differ\).*overwrite=True"):
        L.build_zoo(loaded, corpus, root, other, progress=False)
    zoo3 = L.build_zoo(loaded, corpus, root, other, overwrite=True, progress=False)
    assert all(v != before[k] for k, v in _mtimes(root).items())
    assert json.loads((root / "en_00" / "adapter_config.json").read_text())["qhelpers"]["steps"] == 3
    assert zoo3.manifest["zoo_config"]["steps"] == 3


def test_killed_build_leaves_no_half_adapter(built_zoo, tmp_path, monkeypatch):
    loaded, corpus, _, _ = built_zoo
    root = tmp_path / "z"
    import safetensors.torch as st

    real_save = st.save_file
    calls = {"n": 0}

    def dying_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second adapter dies half-written
            Path(filename).write_bytes(b"half")
            raise KeyboardInterrupt("killed")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        L.build_zoo(loaded, corpus, root, ZOO_CFG, progress=False)
    monkeypatch.setattr(st, "save_file", real_save)
    assert sorted(p.name for p in root.iterdir()) == ["en_00", "zoo.json"]  # no tmp folder, no en_01
    with pytest.raises(L.ZooError, match="no labels.csv"):
        L.load_zoo(root)
    first = _mtimes(root)["en_00"]
    zoo = L.build_zoo(loaded, corpus, root, ZOO_CFG, progress=False)
    assert _mtimes(root)["en_00"] == first and len(zoo.adapters) == 4


def test_default_zoo_dir_is_keyed_by_settings(built_zoo, tmp_path, monkeypatch):
    loaded, corpus, _, _ = built_zoo
    monkeypatch.setenv("QHELPERS_CACHE", str(tmp_path))
    d1 = L.default_zoo_dir(loaded, corpus, ZOO_CFG)
    assert d1 == L.default_zoo_dir(loaded, corpus, ZOO_CFG)
    assert d1.parent == tmp_path / "lora_zoos" and d1.name.startswith("tiny_gpt2-")
    assert L.default_zoo_dir(loaded, corpus, L.ZooConfig(**{**ZOO_CFG.__dict__, "seed": 1})) != d1
    assert L.default_zoo_dir(loaded, corpus.select(n_texts=3), ZOO_CFG) != d1


def test_texts_per_adapter_above_corpus_size_is_config_error(tiny_model):
    corpus = load_corpus("udhr", langs=["en", "he"], n_texts=2, seed=0)
    with pytest.raises(ConfigError, match=r"texts_per_adapter=4.*only 2 texts in 'en'.*N_TEXTS"):
        L.zoo_plan(corpus, L.ZooConfig(langs=("en", "he")))


# ----------------------------------------------------------------------------- malformed zoos


def _fake_zoo(root: Path, labels: dict[str, str], *, layers=(0, 1), rank=2, dtype=np.float32, manifest=True,
              write_labels=True) -> Path:
    """A zoo written by hand (no training): modules q/v per layer of a llama-like model."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for adapter in labels:
        folder = root / adapter
        folder.mkdir()
        state = {}
        for layer in layers:
            for mod, out in (("q_proj", 8), ("v_proj", 4)):
                key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
                state[f"{key}.lora_A.weight"] = rng.normal(size=(rank, 8)).astype(dtype)
                state[f"{key}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(dtype)
        save_np(state, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 4}))
    if write_labels:
        (root / "labels.csv").write_text("adapter,label\n" + "".join(f"{a},{c}\n" for a, c in labels.items()))
    if manifest:
        (root / "zoo.json").write_text(json.dumps({"format": L.FORMAT, "model_type": "llama"}))
    return root


GOOD = {"a1": "en", "a2": "en", "b1": "he", "b2": "he"}


def test_fake_zoo_loads_with_known_names_and_values(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD, dtype=np.float16, manifest=False)  # plain PEFT folder, fp16
    zoo = L.load_zoo(root)
    names = zoo.matrix_names()
    assert names == [f"L{l}.model.layers.{l}.self_attn.{m}.lora_{ab}" for l in (0, 1) for m in ("q_proj", "v_proj")
                     for ab in "AB"]
    from safetensors.numpy import load_file

    raw = load_file(str(root / "b1" / "adapter_model.safetensors"))
    m = zoo.matrices(["L1.model.layers.1.self_attn.v_proj.lora_B"])["L1.model.layers.1.self_attn.v_proj.lora_B"]
    assert m.dtype == np.float32 and m.shape == (4, 4, 2)
    assert np.array_equal(m[zoo.adapters.index("b1")], raw["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].astype(np.float32))
    assert zoo.y().tolist() == [0, 0, 1, 1] and zoo.scaling() == {a: 2.0 for a in GOOD}
    assert zoo.layer_of("model.layers.1.self_attn.q_proj") == 1


def test_missing_zoo_folder(tmp_path):
    with pytest.raises(L.ZooError, match=r"does not exist.*build_zoo"):
        L.load_zoo(tmp_path / "nope")


def test_missing_labels_csv(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD, write_labels=False)
    with pytest.raises(L.ZooError, match=r"no labels.csv.*header 'adapter,label'"):
        L.load_zoo(root)


def test_labels_csv_without_columns(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD)
    (root / "labels.csv").write_text("name,class\na1,en\n")
    with pytest.raises(L.ZooError, match=r"columns 'adapter' and 'label'.*found \['name', 'class'\]"):
        L.load_zoo(root)


def test_labels_for_missing_adapters(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD)
    shutil.rmtree(root / "b2")
    with pytest.raises(L.ZooError, match=r"labels for missing adapters.*b2.*remove those rows"):
        L.load_zoo(root)


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "adapter_config.json"])
def test_missing_adapter_files(tmp_path, missing):
    root = _fake_zoo(tmp_path / "z", GOOD)
    (root / "a2" / missing).unlink()
    with pytest.raises(L.ZooError, match=rf"missing adapter files.*a2: {missing}.*rerun build_zoo"):
        L.load_zoo(root)


def test_adapter_folder_without_label(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD)
    shutil.copytree(root / "a1", root / "stray")
    with pytest.raises(L.ZooError, match=r"adapter folders with no label.*stray.*add an 'adapter,label' row"):
        L.load_zoo(root)


def test_adapter_with_different_shapes(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD)
    _fake_zoo(tmp_path / "r8", {"b2": "he"}, rank=3)
    shutil.rmtree(root / "b2")
    shutil.copytree(tmp_path / "r8" / "b2", root / "b2")
    with pytest.raises(L.ZooError, match=r"adapters b2 have different matrix sets or shapes.*shapes differ.*\(3, 8\) vs \(2, 8\)"):
        L.load_zoo(root)


def test_adapter_with_different_matrix_set(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD)
    _fake_zoo(tmp_path / "l3", {"a1": "en"}, layers=(0, 1, 2))
    shutil.rmtree(root / "a1")
    shutil.copytree(tmp_path / "l3" / "a1", root / "a1")
    with pytest.raises(L.ZooError, match=r"adapters a1 have different matrix sets.*has extra L2\."):
        L.load_zoo(root)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_matrix(tmp_path, bad):
    root = _fake_zoo(tmp_path / "z", GOOD)
    from safetensors.numpy import load_file

    path = root / "b1" / "adapter_model.safetensors"
    state = load_file(str(path))
    state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][2, 1] = bad
    save_np(state, str(path))
    with pytest.raises(L.ZooError, match=r"NaN/inf values in adapters b1 \(e.g. b1:L1\.model\.layers\.1\.self_attn\.q_proj\.lora_B\).*lower lr"):
        L.load_zoo(root)


def test_fewer_than_two_classes(tmp_path):
    root = _fake_zoo(tmp_path / "z", {"a1": "en", "a2": "en", "a3": "en"})
    with pytest.raises(L.ZooError, match=r"only 1 class \(en\).*a1, a2, a3.*at least 2 classes"):
        L.load_zoo(root)


def test_class_with_one_adapter(tmp_path):
    root = _fake_zoo(tmp_path / "z", {"a1": "en", "a2": "en", "b1": "he"})
    with pytest.raises(L.ZooError, match=r"classes with fewer than 2 adapters: he \(b1\)"):
        L.load_zoo(root)


def test_pickle_bin_instead_of_safetensors(tmp_path):
    root = _fake_zoo(tmp_path / "z", GOOD)
    (root / "b2" / "adapter_model.safetensors").rename(root / "b2" / "adapter_model.bin")
    with pytest.raises(L.ZooError, match=r"adapters b2 store adapter_model.bin.*never loads; convert.*adapter_model.safetensors"):
        L.load_zoo(root)


def test_training_precision_upcasts_fp16_and_restores_bit_identically():
    from qhelpers.experiments.lora.zoo import training_precision

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).half()
    model.register_buffer("freq", torch.arange(3, dtype=torch.float32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with training_precision(model) as upcast:
        assert upcast == torch.float16
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.freq.dtype == torch.float32  # buffers are left alone
        # float16 overflows where float32 does not: the reason for the upcast
        assert torch.isinf(torch.tensor(300.0, dtype=torch.float16) ** 2)
    assert list(model.parameters()) == params  # the same Parameter objects
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    fp32 = torch.nn.Linear(2, 2)
    with training_precision(fp32) as upcast:
        assert upcast is None


def test_fp16_model_trains_finite_adapters_and_stays_bit_identical(tiny_model):
    tiny_fp16 = tiny_model("llama", fresh=True, dtype="fp16")
    before = {k: v.clone() for k, v in tiny_fp16.model.state_dict().items()}
    trained = L.train_adapter(tiny_fp16, ["The quick brown fox jumps over the lazy dog. " * 4], steps=3, max_length=32)
    assert all(np.isfinite(x) for x in trained.losses)
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in trained.tensors.values())
    for k, v in tiny_fp16.model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
