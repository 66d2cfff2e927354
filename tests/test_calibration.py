"""Calibration text (qhelpers.text.calibration): shipped, cleaned, kept apart from the UDHR
evaluation text, and drawn as 'en' / '<lang>' / 'mix' (equal tokens per language) / 'none'."""
from __future__ import annotations

import importlib.resources
import json
import re
from collections import Counter

import pytest

from qhelpers.text import calibration as cal
from qhelpers.text.calibration import (
    available_calibration_languages,
    build_calibration_data,
    calibration_info,
    calibration_paragraphs,
    calibration_texts,
    clean_dataset_build_text,
)
from qhelpers.text.corpora import LANGUAGES, SEED_LANGS, gpt2_tokenizer_dir, load_corpus
from qhelpers.util.errors import ConfigError

DATA = importlib.resources.files("qhelpers").joinpath("data", "calibration")
NON_LATIN = [c for c in available_calibration_languages() if LANGUAGES[c].iso15924 != "Latn"]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))


def test_shipped_languages_sizes_and_origin():
    langs = available_calibration_languages()
    assert set(SEED_LANGS) <= set(langs) and set(langs) <= set(LANGUAGES)
    assert list(langs) == [c for c in LANGUAGES if c in langs]  # LANGUAGES order
    # every qhelpers language that dataset-build 0.1.11 covers (its 37 less 14 that qhelpers does not evaluate)
    assert set(langs) == set("en de fr zh ar he sw es ja ru pt it pl tr vi ko hi fi el th bn uk id".split())
    total = 0
    for lang in langs:
        raw = DATA.joinpath(f"{lang}.txt").read_bytes()
        assert 30_000 < len(raw) < 42_000, lang
        total += len(raw)
        info = calibration_info(lang)
        assert info["n_chars"] == sum(len(p) for p in calibration_paragraphs(lang))
        assert info["n_paragraphs"] == len(calibration_paragraphs(lang))
        assert info["licence"] == "BSD-2-Clause" and info["parallel"] is False
        assert info["source"] == "PyPI dataset-build==0.1.11" and "Gemini" in info["generator"]
    assert total < 1_000_000
    origin = DATA.joinpath("ORIGIN.txt").read_text(encoding="utf-8")
    assert "MACHINE-GENERATED" in origin and "Redistribution and use in source and binary forms" in origin
    assert "dataset-build==0.1.11" in origin and "Copyright 2025 electroglyph" in origin


def _shingles(text: str, k: int = 40) -> set[str]:
    t = " ".join(text.split())
    return {t[i:i + k] for i in range(max(1, len(t) - k + 1))}


def test_no_calibration_text_in_the_udhr_evaluation_text():
    udhr = load_corpus("udhr")
    checked = 0
    for lang in available_calibration_languages():
        if lang not in udhr.texts:
            continue
        evaluation = set().union(*(_shingles(t) for t in udhr.texts[lang]))
        calibration = "\n".join(calibration_paragraphs(lang))
        shared = evaluation & _shingles(calibration)
        assert not shared, f"{lang}: {len(shared)} 40-character passages shared with the UDHR"
        checked += 1
    assert checked >= len(SEED_LANGS)


def test_the_shingle_check_sees_a_planted_udhr_passage():
    udhr = load_corpus("udhr").texts["en"][3]
    assert _shingles(udhr) & _shingles("Some calibration text. " + udhr[10:80] + " More text.")


def test_preambles_headings_markdown_and_english_glosses_are_gone():
    preambles = {"en": "Of course. Here is", "de": "Absolut. Hier sind", "fr": "Absolument. Voici",
                 "zh": "好的，我将为您生成", "ar": "بالتأكيد. سأقوم", "he": "בטח, אני מבין", "sw": "Sawa, nimeelewa",
                 "uk": "Ось текст, розділений"}
    for lang in available_calibration_languages():
        text = "\n\n".join(calibration_paragraphs(lang))
        assert not text.startswith(preambles.get(lang, "\0")), lang
        assert not re.search(r"^\s*(#|---|\*\*\*|[*-] )", text, re.M), lang
        assert "**" not in text and "`" not in text, lang
        # the chatbot's own word counts (preambles and section titles: "30,000 words", "~3000 sanaa")
        assert not re.search(r"\b30[ ,.\u00a0]?000\b|\(~?3000 ", text), lang
    en = calibration_paragraphs("en")
    assert all(p.strip() not in ("1. Scientific and Technical Disciplines",
                                 "Physics: Probing the Fundamental Nature of Reality") for p in en)
    assert any("(gravitational lensing)" in p for p in en)  # English keeps its parentheses
    # non-Latin scripts: no parenthesis of ASCII text with a Latin letter is left
    for lang in NON_LATIN:
        for para in calibration_paragraphs(lang):
            for inside in re.findall(r"[(（]([^()（）]*)[)）]", para):
                assert not (inside.isascii() and re.search("[A-Za-z]", inside)), (lang, inside)
    sw = "\n".join(calibration_paragraphs("sw"))
    for gloss in ("(Scientific and Technical Disciplines)", "(Relativity)", "(Quantum Mechanics)", "(gravity)"):
        assert gloss not in sw
    assert "Nadharia ya Uhusianifu" in sw and "(au teknolojia)" in sw  # Swahili text and parentheses stay


def test_cleaning_a_dataset_build_file_by_hand():
    raw = (
        "Sawa, nimeelewa ombi lako. Nitakuandikia maneno 30,000.\n\nHapa kuna maandishi yenyewe:\n\n"
        "1. Sayansi na Ufundi (Scientific and Technical Disciplines)\n\n"
        "Sayansi ni **nguzo** muhimu ya maendeleo (Scientific Progress), na ufundi (au teknolojia) ni matumizi yake. "
        "Teknolojia au sayansi?\n\n"
        "### **Fizikia: Misingi ya Ulimwengu**\n\n"
        "*   **Nishati:** Nishati ni uwezo wa kufanya kazi.\n*   Kazi ni nguvu mara umbali.\n\n"
        "---\n\nFupi.\n"
    )
    english = frozenset({"scientific", "progress", "and", "technical", "disciplines"})
    assert clean_dataset_build_text(raw, "sw", english) == [
        "Sayansi ni nguzo muhimu ya maendeleo, na ufundi (au teknolojia) ni matumizi yake. Teknolojia au sayansi?",
        "Nishati: Nishati ni uwezo wa kufanya kazi.\nKazi ni nguvu mara umbali.",
    ]
    hebrew = "בטח, אני מבין.\n\n1. מדעים\n\nמכניקת הקוונטים (Quantum Mechanics) היא ענף (ראו להלן) חשוב מאוד.\n"
    assert clean_dataset_build_text(hebrew, "he") == ["מכניקת הקוונטים היא ענף (ראו להלן) חשוב מאוד."]
    with pytest.raises(ConfigError, match="heading"):
        clean_dataset_build_text("Just one sentence.\n", "de")


def test_build_writes_the_files_from_a_source_folder(tmp_path):
    source = tmp_path / "x" / "dataset_build" / "data"
    for iso, body in (("eng", "Of course. Here it is.\n\n1. Science\n\nScience is a way of knowing things about the world.\n"),
                      ("swa", "Sawa.\n\n1. Sayansi (Science)\n\nSayansi ni njia ya kujua mambo (science) ya dunia.\n"),
                      ("xyz", "Not a qhelpers language.\n\n1. Title\n\nIgnored text that is long enough.\n")):
        (source / iso).mkdir(parents=True)
        (source / iso / f"{iso}.txt").write_text(body, encoding="utf-8")
    lic = tmp_path / "x" / "dataset_build-0.1.11.dist-info" / "licenses"
    lic.mkdir(parents=True)
    (lic / "LICENSE").write_text("Copyright 2025 electroglyph\n", encoding="utf-8")
    manifest = build_calibration_data(source, tmp_path / "out")
    assert list(manifest["languages"]) == ["en", "sw"]
    assert (tmp_path / "out" / "sw.txt").read_text(encoding="utf-8") == "Sayansi ni njia ya kujua mambo ya dunia.\n"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["languages"]["sw"]["source_file"] == "dataset_build/data/swa/swa.txt"
    assert "Copyright 2025 electroglyph" in (tmp_path / "out" / "ORIGIN.txt").read_text(encoding="utf-8")


def test_language_sets_are_paragraph_chunks():
    texts = calibration_texts("sw", max_chars=600)
    paragraphs = calibration_paragraphs("sw")
    assert all(0 < len(t) <= 600 for t in texts)
    joined = "\n\n".join(paragraphs)
    assert "".join("".join(t.split()) for t in texts) == "".join(joined.split())  # all the text, in order
    for text in texts:  # whole paragraphs, or pieces of one cut after a sentence
        for part in text.split("\n\n"):
            home = next(p for p in paragraphs if part in p)
            assert part == home or re.search(r"[.!?;:]$", part) or home.endswith(part), part[-40:]
    assert calibration_texts("none") == [] and calibration_texts("none", n_texts=5) == []
    a = calibration_texts("en", n_texts=5, seed=1)
    assert a == calibration_texts("en", n_texts=5, seed=1) and a != calibration_texts("en", n_texts=5, seed=2)
    assert len(a) == 5 and set(a) <= set(calibration_texts("en"))
    with pytest.raises(ConfigError, match="fewer texts"):
        calibration_texts("zh", n_texts=10_000)


def _lang_of(text: str) -> str:
    head = text.split("\n\n")[0][:50]
    return next(lang for lang in SEED_LANGS if any(head in p for p in calibration_paragraphs(lang)))


@pytest.mark.parametrize("n_texts", [None, 14, 30])
def test_mix_has_equal_tokens_per_language(n_texts, gpt2_tokenizer):
    texts = calibration_texts("mix", n_texts=n_texts, tokenizer=gpt2_tokenizer)
    langs = [_lang_of(t) for t in texts]
    assert set(langs) == set(SEED_LANGS)
    if n_texts is not None:
        assert len(texts) == n_texts and max(Counter(langs).values()) - min(Counter(langs).values()) <= 1
        assert langs[:7] == list(SEED_LANGS)  # interleaved
    tokens = Counter()
    for lang, text in zip(langs, texts):
        tokens[lang] += len(gpt2_tokenizer(text, add_special_tokens=False)["input_ids"])
    per_text = Counter(langs)
    target = min(tokens.values())
    for lang in SEED_LANGS:  # re-tokenizing a cut text can shift its boundary by a token
        assert tokens[lang] - target <= per_text[lang], (lang, tokens)
    # bytes without a tokenizer: equal within a character (<= 4 bytes) per text
    texts = calibration_texts("mix", n_texts=n_texts)
    size = Counter()
    for text in texts:
        size[_lang_of(text)] += len(text.encode("utf-8"))
    assert max(size.values()) - min(size.values()) <= 4 * max(Counter(map(_lang_of, texts)).values())
    if n_texts is None:  # the balance did something: the shipped texts differ in tokens (~40 KB each)
        own = {lang: sum(len(gpt2_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in calibration_texts(lang))
               for lang in SEED_LANGS}
        assert max(own.values()) > 1.5 * min(own.values())
        assert target <= min(own.values()) <= target + per_text[min(own, key=own.get)]


def test_mix_over_chosen_languages_and_bad_names():
    texts = calibration_texts("mix", n_texts=4, langs=["en", "ja"])
    assert len(texts) == 4 and any(re.search("[\u3040-\u30ff]", t) for t in texts)
    for bad, match in (("xx", "valid: en, de"), ("ka", "Georgian is evaluated"), ("EN", "mix, none")):
        with pytest.raises(ConfigError, match=match):
            calibration_texts(bad)
    with pytest.raises(ConfigError, match="langs"):
        calibration_texts("mix", langs="en")
    with pytest.raises(ConfigError, match="calibration language in langs"):
        calibration_texts("mix", langs=["en", "ka"])
    with pytest.raises(ConfigError, match="n_texts >= 7"):
        calibration_texts("mix", n_texts=3)
    with pytest.raises(ConfigError, match="max_chars"):
        calibration_texts("en", max_chars=10)
    assert calibration_info("none")["n_chars"] == 0
    mix = calibration_info("mix")
    assert mix["langs"] == list(SEED_LANGS) and mix["n_chars"] == sum(calibration_info(c)["n_chars"] for c in SEED_LANGS)
    assert cal.DEFAULT_MAX_CHARS == 1000


LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


@pytest.mark.parametrize("entry", ["encode_text", "mix", "calibration_windows"])
def test_long_texts_tokenize_without_the_transformers_length_warning(entry):
    """qhelpers cuts texts into windows itself, so transformers' "sequence length is longer than the
    specified maximum" warning (seen in executed notebooks on tiny:llama, context 256) is noise: the
    three places that tokenize whole texts ask for no such warning.

    Read from the flag transformers sets on the tokenizer when it warns (once per tokenizer), not from its
    log: earlier in the full test run a logging configuration (``disable_existing_loggers``) leaves
    transformers' loggers disabled (seen: ``logger.disabled`` is True), so nothing reaches stderr or a
    handler either way."""
    from qhelpers.models.loading import gpt2_tokenizer as make_tokenizer
    from qhelpers.quant.autoround import calibration_windows
    from qhelpers.text.encoding import encode_text

    tokenizer = make_tokenizer(model_max_length=32)  # fresh: no warning given yet
    long_text = "the right of everyone to education " * 40
    if entry == "encode_text":
        assert len(encode_text(tokenizer, long_text)) > 32
    elif entry == "mix":
        assert calibration_texts("mix", n_texts=7, tokenizer=tokenizer)
    else:
        assert len(calibration_windows(tokenizer, [long_text], n_samples=2, seqlen=48)) == 2
    assert not tokenizer.deprecation_warnings.get(LENGTH_WARNING)
    # the check can fail: the same tokenizer, called directly, does warn
    tokenizer(long_text)
    assert tokenizer.deprecation_warnings.get(LENGTH_WARNING)


def test_tokenize_calls_other_tokenizers_as_given():
    """A tokenizer that is not transformers' (any callable returning input_ids) gets no ``verbose``."""
    from qhelpers.text.encoding import tokenize

    def by_char(text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    assert tokenize(by_char, "ab", add_special_tokens=False)["input_ids"] == [97, 98]
