"""Training text for the demo model: the docstrings of Python's standard library.

The text has to exist on every machine that runs loong_jax without a download,
and the standard library's own source is exactly such text: plain English about
programming, a few MB of it.

Data flow:
  1. `stdlib_source_files()` walks the standard library folder of the running
     interpreter in sorted order, skipping site-packages, tests, IDLE, lib2to3
     and other folders whose docstrings are test fixtures or near-duplicates.
  2. `module_docstrings(source, module_name)` parses one file with `ast` and
     yields (kind, qualified name, docstring) for the module, its classes and
     functions in source order.
  3. `normalise_docstring(text, max_paragraphs)` dedents, strips trailing
     spaces, collapses runs of blank lines, keeps the opening paragraphs and
     drops docstrings that are too short or mostly non-text (doctest
     sessions, ASCII tables).
  4. `collect_documents()` returns the distinct documents (one docstring
     each, with the name it documents) in a deterministic order;
     `corpus_stats` summarises them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Folders (first path component under the stdlib root) whose text is not
# useful prose: test suites, GUI tools, vendored code, the 2to3 fixers.
SKIPPED_TOP_LEVEL = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
    "ensurepip", "venv", "pydoc_data", "config-3.11-x86_64-linux-gnu", "__pycache__",
    "tkinter", "unittest",  # unittest's docstrings are mostly about tests of tests
})
SKIPPED_PARTS = frozenset({"test", "tests", "__pycache__", "idle_test"})

MIN_DOC_CHARS = 40
MAX_DOC_CHARS = 6000
MIN_LETTER_FRACTION = 0.6  # letters + spaces over all characters


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """All .py files of the standard library that carry prose, sorted by path."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0] in SKIPPED_TOP_LEVEL or SKIPPED_PARTS & set(relative.parts[:-1]):
            continue
        if relative.parts[0].startswith("config-") or path.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(source: str, module_name: str) -> Iterator[tuple[str, str, str]]:
    """(kind, qualified name, docstring) of the module, its classes and
    functions, in source order; kind is "module", "class" or "function" and
    nested definitions get dotted names (`json.JSONEncoder.encode`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(source)

    def walk(node: ast.AST, qualname: str) -> Iterator[tuple[str, str, str]]:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            kind = ("module" if isinstance(node, ast.Module)
                    else "class" if isinstance(node, ast.ClassDef) else "function")
            yield kind, qualname, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, f"{qualname}.{child.name}")

    yield from walk(tree, module_name)


def module_name_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def normalise_docstring(doc: str, max_paragraphs: int | None = None) -> str | None:
    """Cleaned text of one docstring (its first `max_paragraphs` paragraphs when
    given), or None when it is not useful prose."""
    text = inspect.cleandoc(doc)
    lines = [line.rstrip() for line in text.splitlines()]
    # Doctest sessions are code, not prose; keep the prose around them.
    lines = [line for line in lines if not line.lstrip().startswith((">>>", "..."))]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    text = text.replace("\t", "    ")
    if max_paragraphs is not None:
        text = "\n\n".join(text.split("\n\n")[:max_paragraphs])
    if not (MIN_DOC_CHARS <= len(text) <= MAX_DOC_CHARS):
        return None
    if not text.isascii():
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if letters / len(text) < MIN_LETTER_FRACTION:
        return None
    return text


@dataclasses.dataclass(frozen=True)
class Document:
    kind: str  # "module", "class" or "function"
    name: str  # qualified name of what the docstring documents, e.g. "os.path.join"
    text: str  # the normalised docstring


def collect_documents(root: Path | None = None, max_paragraphs: int | None = None) -> list[Document]:
    """Distinct normalised docstrings of the standard library, deterministic order.

    max_paragraphs keeps the opening paragraphs only: they are the prose
    (summary and description); later ones lean to argument tables and examples."""
    root = root or stdlib_root()
    seen: set[str] = set()
    documents = []
    for path in stdlib_source_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            docstrings = list(module_docstrings(source, module_name_of(path, root)))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or Python 2 fixtures
        for kind, name, doc in docstrings:
            text = normalise_docstring(doc, max_paragraphs)
            if text is not None and text not in seen:
                seen.add(text)
                documents.append(Document(kind, name, text))
    return documents


def corpus_stats(documents: list[Document]) -> dict[str, int]:
    return {
        "documents": len(documents),
        "characters": sum(len(d.text) for d in documents),
        "words": sum(len(d.text.split()) for d in documents),
    }


if __name__ == "__main__":
    docs = collect_documents()
    print(corpus_stats(docs))
    for doc in docs[:3]:
        print("-" * 40, doc.name)
        print(doc.text)
