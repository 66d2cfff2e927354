"""Tests of qhelpers.text.corpora and its packaged data (known answers, not re-derivations)."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import sys
import unicodedata
from pathlib import Path

import pytest

from qhelpers.text.corpora import (
    LANGUAGES,
    SEED_LANGS,
    Corpus,
    available_corpora,
    corpus_metadata,
    get_language,
    gpt2_tokenizer_dir,
    language_covariates,
    load_corpus,
)
from qhelpers.util.errors import CorpusError

SEVEN = ("en", "de", "fr", "zh", "ar", "he", "sw")
ROOT = Path(__file__).resolve().parent.parent

#: sha256 of "lang\tid\ttext\n" over the seven languages' (id, text) pairs, computed from
#: udhr.json BEFORE the corpus grew to 61 languages: the seeds' texts must never change.
SEVEN_TEXTS_SHA256 = "da357ce9fd918b20a2131808b766d02b3354dabe6e5efab98aa2cc6253afae5d"

# Article 1 in other official translations (typed from the OHCHR/UN texts, not the data).
ARTICLE_1_MORE = {
    "ru": "Все люди рождаются свободными и равными в своем достоинстве и правах.",
    "es": "Todos los seres humanos nacen libres e iguales en dignidad y derechos",
    "ja": "すべての人間は、生まれながらにして自由であり、かつ、尊厳と権利とについて平等である。",
    "pt": "Todos os seres humanos nascem livres e iguais em dignidade e direitos.",
}

# Known UDHR Article 1 in three official versions (typed from the UN text, not the data).
ARTICLE_1 = {
    "en": "All human beings are born free and equal in dignity and rights. They are endowed "
          "with reason and conscience and should act towards one another in a spirit of "
          "brotherhood.",
    "de": "Alle Menschen sind frei und gleich an Würde und Rechten geboren.",
    "fr": "Tous les êtres humains naissent libres et égaux en dignité et en droits.",
}


# ---------------------------------------------------------------------------- languages
def test_languages_resource_and_group():
    assert tuple(LANGUAGES)[:7] == SEVEN == SEED_LANGS and len(LANGUAGES) >= 40
    assert {c for c, l in LANGUAGES.items() if l.resource == "high"} == {"en", "de", "fr", "zh"}
    # only the seeds' seven carry the seeds' label; the others have none (and no HR/LR group)
    assert {c for c, l in LANGUAGES.items() if l.resource is not None} == set(SEVEN)
    assert get_language("ja").resource is None and get_language("ja").group is None
    assert get_language("ar").resource == "medium"
    assert get_language("he").resource == get_language("sw").resource == "low"
    assert [LANGUAGES[c].group for c in SEVEN] == ["HR"] * 4 + ["LR"] * 3
    assert get_language("sw").family == "Bantu/Niger-Congo"
    assert get_language("he").script == "Hebrew"


def test_unknown_language_lists_known_codes():
    with pytest.raises(CorpusError, match=r"Unknown language code 'xx'.*en, de, fr, zh, ar, he, sw, es"):
        get_language("xx")


# ---------------------------------------------------------------------------- UDHR
def test_udhr_counts_equal_and_ids_aligned():
    c = load_corpus("udhr")
    assert c.langs[:7] == SEVEN and len(c.langs) >= 40 and c.parallel
    counts = {lang: c.n_texts(lang) for lang in c.langs}
    # Articles 1-30 have 50 paragraphs in every language. (The 58-60 in research.md counts
    # every <p> of the file, preamble included; the preamble is 8-10 paragraphs and does not
    # align, so it is left out.)
    assert set(counts.values()) == {50}, counts
    assert len({c.ids[lang] for lang in c.langs}) == 1
    ids = c.ids["en"]
    assert ids[0] == "a01.p01" and ids[-1] == "a30.p01"
    assert all(re.fullmatch(r"a(0[1-9]|[12]\d|30)\.p0[1-9]", i) for i in ids)
    assert {i[:3] for i in ids} == {f"a{n:02d}" for n in range(1, 31)}
    # Article 23 has 4 paragraphs, article 1 has one.
    assert [i for i in ids if i.startswith("a23.")] == [f"a23.p0{k}" for k in range(1, 5)]


def test_udhr_known_text():
    c = load_corpus("udhr")
    assert c.texts["en"][0] == ARTICLE_1["en"]
    for lang in ("de", "fr"):
        assert c.texts[lang][0].startswith(ARTICLE_1[lang])
    assert c.texts["en"][-1].startswith("Nothing in this Declaration may be interpreted")
    assert c.texts["en"][c.ids["en"].index("a03.p01")] == (
        "Everyone has the right to life, liberty and the security of person.")
    assert c.texts["he"][0].startswith("כל בני אדם נולדו בני חורין")
    assert c.texts["zh"][0].startswith("人人生而自由")
    assert c.texts["sw"][0].startswith("Watu wote wamezaliwa huru")
    assert c.texts["ar"][0].startswith("يولد جميع الناس أحرارًا")


def test_udhr_whitespace_normalised_and_metadata():
    c = load_corpus("udhr")
    for _, _, text in c.items():
        assert text == " ".join(text.split()) and text
    meta = corpus_metadata("udhr")
    assert meta["version"] == "6.0.0" and meta["licence"].startswith("MIT")
    assert meta["languages"]["de"]["source_file"] == "package/declaration/deu_1996.html"
    assert meta["preamble"]["included"] is False
    assert "texts" not in meta


def test_to_frame_bytes_and_chars():
    df = load_corpus("udhr", langs=["en", "zh"], n_texts=1).to_frame()
    assert list(df.columns) == ["lang", "text_id", "text", "n_bytes", "n_chars"]
    assert list(df["lang"]) == ["en", "zh"] and list(df["text_id"]) == ["a01.p01"] * 2
    en, zh = df.iloc[0], df.iloc[1]
    assert en.n_bytes == en.n_chars == len(ARTICLE_1["en"])
    assert zh.n_bytes > 2 * zh.n_chars  # CJK: 3 UTF-8 bytes per Han character


def test_seven_languages_texts_unchanged():
    """Existing notebooks choose the seeds' languages with LANGS: every (lang, id) keeps its text."""
    c = load_corpus("udhr", langs=SEVEN)
    h = hashlib.sha256()
    for lang in SEVEN:
        for i, t in zip(c.ids[lang], c.texts[lang]):
            h.update(f"{lang}\t{i}\t{t}\n".encode())
    assert h.hexdigest() == SEVEN_TEXTS_SHA256
    assert load_corpus("udhr", langs=SEVEN, n_texts=10, sample="random", seed=7).ids["en"] == \
        load_corpus("udhr", n_texts=10, sample="random", seed=7).ids["en"]


def test_udhr_more_languages_known_text_and_scripts():
    c = load_corpus("udhr")
    for lang, start in ARTICLE_1_MORE.items():
        assert c.texts[lang][0].startswith(start), lang
    assert c.texts["ko"][0].startswith("모든 인간은 태어날 때부터 자유로우며")
    # the scripts the study needs are all offered
    scripts = {LANGUAGES[lang].iso15924 for lang in c.langs}
    assert {"Latn", "Cyrl", "Arab", "Hebr", "Deva", "Hans", "Ethi", "Grek", "Thai", "Beng", "Taml",
            "Geor", "Armn", "Hang", "Jpan"} <= scripts
    # each language's letters are in its script (Unicode names, independent of the build script)
    words = {"Latn": ("LATIN",), "Cyrl": ("CYRILLIC",), "Hans": ("CJK",), "Jpan": ("CJK", "HIRAGANA", "KATAKANA"),
             "Hang": ("HANGUL",), "Ethi": ("ETHIOPIC",), "Grek": ("GREEK",), "Geor": ("GEORGIAN",), "Armn": ("ARMENIAN",)}
    for lang in c.langs:
        want = words.get(LANGUAGES[lang].iso15924)
        if want is None:
            continue
        letters = [unicodedata.name(ch, "?").split()[0] for ch in "".join(c.texts[lang]) if ch.isalpha()]
        assert sum(w in want for w in letters) / len(letters) > 0.9, lang


def test_joshi_classes_match_the_papers_examples():
    # Joshi et al. (2020), Table 1's example languages per class, a known answer independent of
    # the list the data were read from.
    examples = {5: ("en", "es", "de", "ja", "fr"), 4: ("ru", "vi", "ko"), 3: ("id", "uk", "he"),
                2: ("zu", "lo", "mt", "ga"), 1: ("chr",)}
    for cls, langs in examples.items():
        for lang in langs:
            assert get_language(lang).joshi_class == cls, lang
    classes = {l.joshi_class for l in LANGUAGES.values()}
    assert classes == {0, 1, 2, 3, 4, 5}  # every class is represented


def test_language_covariates():
    df = language_covariates(["he", "en", "zh"])
    assert list(df["lang"]) == ["he", "en", "zh"]
    assert list(df.columns[:5]) == ["lang", "name", "script", "iso15924", "family"]
    assert list(df["seed_group"]) == ["LR", "HR", "HR"] and list(df["joshi_class"]) == [3.0, 5.0, 5.0]
    # bytes per character recomputed from the corpus's own texts
    frame = load_corpus("udhr", langs=["he", "en", "zh"]).to_frame()
    per = frame.groupby("lang")[["n_bytes", "n_chars"]].sum()
    for _, row in df.iterrows():
        assert row.utf8_bytes_per_char == pytest.approx(per.loc[row.lang, "n_bytes"] / per.loc[row.lang, "n_chars"], rel=1e-6)
    assert list(df["script_bytes"]) == [2, 1, 3]
    full = language_covariates()
    assert list(full["lang"]) == list(load_corpus("udhr").langs) and full["joshi_class"].notna().all()
    assert full.loc[full.lang == "ja", ["seed_resource", "seed_group"]].isna().all(axis=None)
    assert "Joshi" in df.attrs["sources"]["joshi_class"]["citation"]
    with pytest.raises(CorpusError, match=r"no covariates for language codes \['xx'\]"):
        language_covariates(["en", "xx"])


def test_language_covariates_unlisted_class_is_nan(monkeypatch):
    import qhelpers.text.corpora as corpora

    real = corpora._load_json("languages.json")
    fake = {**real, "languages": {**real["languages"], "en": {**real["languages"]["en"], "joshi_class": None}}}
    monkeypatch.setattr(corpora, "_load_json", lambda name: fake if name == "languages.json" else real)
    assert math.isnan(corpora.language_covariates(["en"])["joshi_class"].item())


# ---------------------------------------------------------------------------- build script
@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_corpora", ROOT / "scripts" / "build_corpora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpora"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("build_corpora", None)


def test_build_admission_helpers(build):
    assert build.script_share("Привет мир", "Cyrl") == 1.0
    assert build.script_share("Привет world", "Cyrl") == pytest.approx(6 / 11)
    assert build.modal_utf8_bytes("שלום, wor!") == 2  # 4 Hebrew letters (2 bytes each), 3 Latin (1 byte)
    assert build.modal_utf8_bytes("שלום, world!") == 1  # 5 Latin letters outnumber them
    assert build.modal_utf8_bytes("人人生而自由 ok") == 3
    assert build.length_ratios(["aa", "aaaaaa"], ["a", "aaa"]) == pytest.approx([1.0, 1.0])
    assert build.PLACEHOLDER.match("&1") and not build.PLACEHOLDER.match("&1 more")
    # the embedded language table agrees with the packaged data
    assert [s.code for s in build.LANGUAGE_SPECS] == list(LANGUAGES)
    assert all(build.SPECS[c].joshi_class == l.joshi_class for c, l in LANGUAGES.items())


def test_build_checks_joshi_classes_against_a_list(build, tmp_path):
    good = tmp_path / "lang2tax.txt"
    lines = [f"{s.joshi_name},{s.joshi_class}" for s in build.LANGUAGE_SPECS if s.joshi_name]
    good.write_text("\n".join(["sinhala,0", *lines]) + "\n", encoding="utf-8")
    build.check_lang2tax(good)  # no error
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(l if not l.startswith("hebrew,") else "hebrew,1" for l in lines), encoding="utf-8")
    with pytest.raises(build.BuildError, match=r"he: 'hebrew' is class 3 here, \[1\]"):
        build.check_lang2tax(bad)


# ---------------------------------------------------------------------------- seeds
def test_available_corpora():
    assert available_corpora() == ["udhr", "seed-exp003", "seed-exp005", "seed-exp032"]


def test_seed_texts_verbatim():
    s5 = load_corpus("seed-exp005")
    assert s5.langs == ("en", "de", "he", "sw")
    assert all(s5.n_texts(lang) == 3 for lang in s5.langs)
    assert s5.ids["he"] == ("s0", "s1", "s2")
    assert s5.texts["en"][0] == ("The Earth is the third planet from the Sun and the only "
                                 "astronomical object known to harbor life.")
    assert s5.texts["sw"][2] == ("Mabadiliko ya hali ya hewa yanarejelea mabadiliko ya muda "
                                 "mrefu ya halijoto.")
    assert s5.texts["he"][1] == "מתמטיקה היא תחום ידע הכולל מספרים, נוסחאות ומבנים."

    s3 = load_corpus("seed-exp003")
    assert s3.langs == ("en", "fr", "zh", "ar", "he", "sw")
    assert s3.texts["zh"] == ("数学研究揭示了宇宙的基本结构，并为理解复杂现象提供了工具。",)
    assert s3.texts["fr"][0].startswith("L'étude des mathématiques révèle")

    s32 = load_corpus("seed-exp032")
    assert dict(s32.texts) == {
        "en": ("The quick brown fox jumps over the lazy dog.",),
        "he": ("השועל החום המהיר קופץ מעל הכלב העצלן.",),
        "ar": ("الثعلب البني السريع يقفز فوق الكلب الكسول.",),
    }


# ---------------------------------------------------------------------------- selection
def test_select_first_and_order():
    c = load_corpus("udhr", langs=["sw", "en"], n_texts=2)
    assert c.langs == ("sw", "en")
    assert c.ids["sw"] == c.ids["en"] == ("a01.p01", "a02.p01")
    assert list(c.items())[0][:2] == ("sw", "a01.p01")
    assert len(list(c.items())) == 4


def test_random_selection_deterministic_and_aligned():
    a = load_corpus("udhr", n_texts=10, sample="random", seed=7)
    b = load_corpus("udhr", n_texts=10, sample="random", seed=7)
    assert a == b and list(a.items()) == list(b.items())
    assert len({a.ids[lang] for lang in a.langs}) == 1  # same ids in every language
    ids = a.ids["en"]
    assert len(set(ids)) == 10 and list(ids) == sorted(ids)  # kept in corpus order
    assert ids != tuple(load_corpus("udhr").ids["en"][:10])
    assert load_corpus("udhr", n_texts=10, sample="random", seed=8).ids["en"] != ids
    # a language subset draws the same ids
    assert load_corpus("udhr", langs=["he"], n_texts=10, sample="random", seed=7).ids["he"] == ids
    # texts still belong to their ids
    full = load_corpus("udhr")
    for lang, i, t in a.items():
        assert full.texts[lang][full.ids[lang].index(i)] == t


def test_random_selection_non_parallel_is_per_language():
    c = Corpus.from_texts("mine", {"en": [f"e{i}" for i in range(20)],
                                   "de": [f"d{i}" for i in range(20)]})
    x = c.select(n_texts=5, sample="random", seed=3)
    assert x == c.select(n_texts=5, sample="random", seed=3)
    assert x.ids["en"] == c.select(langs=["en"], n_texts=5, sample="random", seed=3).ids["en"]


def test_n_texts_above_available_takes_all():
    c = load_corpus("seed-exp005", n_texts=100)
    assert c.n_texts("en") == 3
    assert load_corpus("seed-exp005", n_texts=100, sample="random").ids["de"] == ("s0", "s1", "s2")


def test_cached_and_immutable():
    assert load_corpus("udhr") is load_corpus("udhr")
    c = load_corpus("seed-exp032")
    with pytest.raises(TypeError):
        c.texts["en"] = ("x",)  # type: ignore[index]


# ---------------------------------------------------------------------------- from_texts
def test_from_texts():
    c = Corpus.from_texts("mine", {"en": ["One.", "Two."], "he": "שלום."})
    assert c.ids == {"en": ("t0", "t1"), "he": ("t0",)}
    assert c.texts["he"] == ("שלום.",) and not c.parallel
    p = Corpus.from_texts("p", {"en": ["a", "b"], "de": ["x", "y"]}, parallel=True)
    assert p.select(n_texts=1, sample="random", seed=1).ids["en"] == \
        p.select(n_texts=1, sample="random", seed=1).ids["de"]


# ---------------------------------------------------------------------------- errors
def test_unknown_corpus_lists_available():
    with pytest.raises(CorpusError, match=r"Unknown corpus 'wiki'.*udhr, seed-exp003, seed-exp005, seed-exp032"):
        load_corpus("wiki")


def test_missing_language_names_available_and_suggests_udhr():
    with pytest.raises(CorpusError, match=r"no texts in 'de'; it has en, fr, zh, ar, he, sw.*load_corpus\('udhr'\)"):
        load_corpus("seed-exp003", langs=["en", "de"])
    with pytest.raises(CorpusError, match=r"no texts in 'xx'"):
        load_corpus("udhr", langs=["xx"])
    with pytest.raises(CorpusError, match=r"no texts in 'fr'"):
        load_corpus("seed-exp032").n_texts("fr")


@pytest.mark.parametrize("n", [0, -3])
def test_n_texts_below_one(n):
    with pytest.raises(CorpusError, match=r"selects no text.*n_texts >= 1"):
        load_corpus("udhr", n_texts=n)


def test_bad_n_texts_type_and_sample():
    with pytest.raises(CorpusError, match=r"whole number"):
        load_corpus("udhr", n_texts=2.5)  # type: ignore[arg-type]
    with pytest.raises(CorpusError, match=r"sample='shuffle'.*'first' or 'random'"):
        load_corpus("udhr", n_texts=2, sample="shuffle")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_text_names_language_and_id(bad):
    with pytest.raises(CorpusError, match=r"text 't1' in language 'sw' is empty or whitespace only\. Remove it"):
        Corpus.from_texts("mine", {"en": ["a", "b"], "sw": ["c", bad]})


def test_language_without_texts():
    with pytest.raises(CorpusError, match=r"language 'he' has no texts"):
        Corpus.from_texts("mine", {"en": ["a"], "he": []})
    with pytest.raises(CorpusError, match=r"has no languages"):
        Corpus.from_texts("mine", {})


def test_duplicate_ids():
    with pytest.raises(CorpusError, match=r"language 'en' repeats ids \['x'\].*unique"):
        Corpus("c", {"en": ["a", "b"]}, {"en": ["x", "x"]})


def test_misaligned_parallel():
    with pytest.raises(CorpusError, match=r"parallel but languages 'en' \(2 texts\) and 'he' \(1 texts\).*only in 'en': \['t1'\]"):
        Corpus.from_texts("p", {"en": ["a", "b"], "he": ["c"]}, parallel=True)
    with pytest.raises(CorpusError, match=r"different order"):
        Corpus("p", {"en": ["a", "b"], "de": ["c", "d"]},
               {"en": ["i1", "i2"], "de": ["i2", "i1"]}, parallel=True)


def test_ids_texts_mismatch_and_non_string():
    with pytest.raises(CorpusError, match=r"2 texts but 1 ids"):
        Corpus("c", {"en": ["a", "b"]}, {"en": ["i1"]})
    with pytest.raises(CorpusError, match=r"has type int, not str"):
        Corpus.from_texts("c", {"en": ["a", 3]})  # type: ignore[list-item]


# ---------------------------------------------------------------------------- tokenizer
def test_gpt2_tokenizer_known_ids():
    transformers = pytest.importorskip("transformers")
    d = gpt2_tokenizer_dir()
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file() and (d / "LICENSE").is_file()
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257


def test_corpus_items_lists_triples_and_rejects_bad_input():
    from qhelpers.text.corpora import corpus_items
    from qhelpers.util.errors import ConfigError, MeasurementError

    corpus = Corpus.from_texts("two", {"en": ["a", "b"], "sw": ["c"]})
    assert corpus_items(corpus) == [("en", "t0", "a"), ("en", "t1", "b"), ("sw", "t0", "c")]
    assert corpus_items([("en", 1, "x")]) == [("en", "1", "x")]
    with pytest.raises(MeasurementError, match="no texts"):
        corpus_items([])
    with pytest.raises(ConfigError, match=r"must be \(lang, text_id, text\)"):
        corpus_items([("en", "x")])
    with pytest.raises(ConfigError, match="repeats a"):
        corpus_items([("en", "t0", "a"), ("en", "t0", "b")])
