"""Measurement: per-text NLL equals a plain model(ids, labels=ids) loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qhelpers.measure.scoring import MeasureConfig, Scorer
from qhelpers.stats.quantities import bits_per_byte, perplexity
from qhelpers.models.loading import load_model
from qhelpers.text.encoding import encode_text
from qhelpers.util.errors import ConfigError, MeasurementError

ARCHS = ["gpt2", "opt", "bloom", "gpt_neox", "llama", "gemma3_text", "qwen2"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "All human beings are born free and equal in dignity and rights.",
    "השועל החום המהיר קופץ מעל הכלב העצלן.",
    "Hi there",
    "Kila mtu anayo haki ya kuishi, uhuru na usalama wa maisha yake. " * 3,
]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return load_model(f"tiny:{request.param}", device="cpu")


def plain_loop_nll(model, ids_list):
    out = []
    with torch.no_grad():
        for ids in ids_list:
            x = torch.tensor([ids])
            loss = model(x, labels=x).loss
            out.append(float(loss) * (len(ids) - 1))
    return np.array(out)


def test_batched_scores_equal_plain_loop(tiny):
    scorer = Scorer(tiny, texts=TEXTS, config=MeasureConfig(batch_tokens=4096))
    assert max(len(b) for b in scorer.batches) > 1, "the test must exercise padded batches"
    ids = [encode_text(tiny.tokenizer, t) for t in TEXTS]
    expected = plain_loop_nll(tiny.model, ids)
    frame = scorer.score()
    np.testing.assert_allclose(frame["nll"].to_numpy(), expected, rtol=2e-5)
    assert frame["n_tokens"].tolist() == [len(i) - 1 for i in ids]
    assert frame["n_bytes"].tolist() == [len(t.encode("utf-8")) for t in TEXTS]


def test_sliding_window_matches_hand_written_windows():
    loaded = load_model("tiny:gpt2", device="cpu")
    text = " ".join(["Everyone has the right to life, liberty and security of person."] * 10)
    ids = encode_text(loaded.tokenizer, text)
    max_length, stride = 32, 12
    assert len(ids) > 3 * max_length
    # Hugging Face's perplexity recipe, written out by hand
    total, scored, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            trg_len = end - prev_end
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[:, :-trg_len] = -100
            n_scored = int((labels[:, 1:] != -100).sum())
            total += float(loaded.model(x, labels=labels).loss) * n_scored
            scored += n_scored
            prev_end = end
            if end == len(ids):
                break
    frame = Scorer(loaded, texts=[text], config=MeasureConfig(max_length=max_length, stride=stride)).score()
    assert int(frame["n_tokens"][0]) == scored == len(ids) - 1
    assert frame["nll"][0] == pytest.approx(total, rel=1e-5)


def test_truncate_scores_only_the_first_window():
    loaded = load_model("tiny:llama", device="cpu")
    text = TEXTS[4]
    config = MeasureConfig(max_length=16, truncate=True, prepend_bos=False, max_batch=1)
    ids = encode_text(loaded.tokenizer, text, prepend_bos=False)[:16]
    frame = Scorer(loaded, texts=[text], config=config).score()
    assert frame["nll"][0] == pytest.approx(plain_loop_nll(loaded.model, [ids])[0], rel=1e-6)
    assert frame["n_tokens"][0] == 15


def test_prepend_bos_scores_the_first_token():
    loaded = load_model("tiny:gpt2", device="cpu")
    with_bos = encode_text(loaded.tokenizer, "Hello world")
    without = encode_text(loaded.tokenizer, "Hello world", prepend_bos=False)
    assert without == [15496, 995]
    assert with_bos == [loaded.tokenizer.eos_token_id, 15496, 995]


def test_perplexity_and_bits_per_byte_by_hand():
    assert perplexity(6.0, 3) == pytest.approx(math.exp(2.0))
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)


def test_bad_inputs_raise_clear_errors():
    loaded = load_model("tiny:gpt2", device="cpu")
    with pytest.raises(MeasurementError, match="empty or whitespace-only"):
        Scorer(loaded, texts=["fine text", "   "])
    with pytest.raises(MeasurementError, match="no texts"):
        Scorer(loaded, texts=[])
    with pytest.raises(ConfigError, match="stride"):
        MeasureConfig(max_length=16, stride=16)
    with pytest.raises(ConfigError, match="max_length"):
        MeasureConfig(max_length=1)


# ----------------------------------------------------------------------------- length batching


def _padded(lengths, groups):
    return sum(max(lengths[i] for i in g) * len(g) for g in groups)


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def _feasible(lengths, groups, budget, max_batch):
    return all(len(g) <= max_batch and (len(g) == 1 or budget is None or max(lengths[i] for i in g) * len(g) <= budget)
               for g in groups)


@pytest.mark.parametrize("seed", range(40))
def test_length_batches_is_optimal_over_every_partition(seed):
    """Against brute force over all set partitions (not only contiguous ones), for small n."""
    from qhelpers.text.encoding import length_batches

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    lengths = [int(x) for x in rng.integers(1, 60, size=n)]
    budget = [None, 64, 100, 150][seed % 4]
    max_batch = [2, 3, 64][seed % 3]
    overhead = [0, 5, 40][seed % 3]
    groups = length_batches(lengths, budget, max_batch, overhead)
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert _feasible(lengths, groups, budget, max_batch)
    best = min(_padded(lengths, p) + overhead * len(p)
               for p in _set_partitions(list(range(n))) if _feasible(lengths, p, budget, max_batch))
    assert _padded(lengths, groups) + overhead * len(groups) == best
    # longest first, inside each batch and across batches
    flat = [i for g in groups for i in g]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


def test_length_batches_hand_example():
    from qhelpers.text.encoding import length_batches

    # budget 400: greedy (fill while it fits) takes [100, 100, 10, 10] (400 padded tokens for
    # 220 real ones); the optimum splits [100, 100] + [10, 10] (240 padded + 2 calls).
    assert length_batches([100, 10, 100, 10], 400, 64, overhead_tokens=10) == [[0, 2], [1, 3]]
    # with a dear forward call, one batch is cheaper
    assert length_batches([100, 10, 100, 10], 400, 64, overhead_tokens=500) == [[0, 2, 1, 3]]
    # a sequence longer than the budget gets its own batch; ties keep index order
    assert length_batches([500, 5, 5], 100, 64, overhead_tokens=1000) == [[0], [1, 2]]
    assert length_batches([], 100) == []
    with pytest.raises(ConfigError, match="max_batch"):
        length_batches([3], 100, 0)


def test_batch_overhead_tokens_by_device():
    from qhelpers.text.encoding import CPU_BATCH_OVERHEAD, batch_overhead_tokens

    assert batch_overhead_tokens("cpu", 2048) == CPU_BATCH_OVERHEAD
    assert batch_overhead_tokens("cuda:0", 8192) == 8192  # a GPU call is priced as a full batch
    assert batch_overhead_tokens(torch.device("cuda"), None) == 16384 > CPU_BATCH_OVERHEAD


def test_default_batch_tokens_by_device():
    from qhelpers.text.encoding import default_batch_tokens

    assert default_batch_tokens("cpu") == 2048
    assert default_batch_tokens(torch.device("cuda:1")) == 16384
