"""The built-in language-model corpus `pydocs`: real English prose that every Python installation has.

Documents, in a fixed order (sorted paths, then source order):
- one per public module of the installed standard library: its module, class and function docstrings
  (cleaned as `inspect.cleandoc` does), separated by blank lines. Test packages, private modules and
  packages (`_name`), private classes and functions, and site-packages are skipped;
- one per topic of `pydoc_data/topics.py` (the language reference's text behind `help("if")`), by topic name.

Sources are parsed with `ast`, never imported. No download, no TensorFlow.
"""
from __future__ import annotations

import ast
import hashlib
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _public(part: str) -> bool:
    return not part.startswith("_") or part == "__init__.py"


def module_files(root: Path | None = None) -> list[Path]:
    """The standard library's public module files, sorted by their path relative to `root`."""
    root = root or stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if not any(p in _SKIP_PARTS for p in parts) and all(_public(p) for p in parts):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(node: ast.AST) -> Iterator[str]:
    """The docstrings of a module/class and of its public classes and functions, in source order."""
    doc = ast.get_docstring(node, clean=True)
    if doc and doc.strip():
        yield doc.strip()
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = child.name
            if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
                if isinstance(child, ast.ClassDef):
                    yield from _docstrings(child)
                else:
                    doc = ast.get_docstring(child, clean=True)
                    if doc and doc.strip():
                        yield doc.strip()


def module_document(path: Path) -> str:
    """One module's docstrings joined by blank lines ('' when it has none or does not parse)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""  # e.g. lib2to3's deliberately broken test data
    return "\n\n".join(_docstrings(tree))


def topic_documents(root: Path | None = None) -> list[str]:
    """The texts of pydoc_data/topics.py's `topics` dict, sorted by topic name (read with ast, not imported)."""
    path = (root or stdlib_dir()) / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    for node in ast.parse(path.read_bytes()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [topics[k].strip() for k in sorted(topics) if isinstance(topics[k], str) and topics[k].strip()]
    return []


def documents(root: Path | None = None) -> Iterator[str]:
    """Every document of the corpus, in its fixed order (empty modules are skipped)."""
    for path in module_files(root):
        doc = module_document(path)
        if doc:
            yield doc
    yield from topic_documents(root)


def fingerprint(root: Path | None = None) -> dict:
    """What the corpus was built from: the Python version and a sha256 over every file read."""
    root = root or stdlib_dir()
    files = module_files(root) + [p for p in [root / "pydoc_data" / "topics.py"] if p.is_file()]
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return {"builtin": "pydocs", "python": platform.python_version(), "files": len(files), "sha256": h.hexdigest()}
