"""Embedded demo corpus: text that ships with Python, so a first run needs no download.

Documents are the language-reference topics of ``pydoc_data/topics.py`` followed by the standard
library's own ``.py`` sources (one document per file, sorted by path), capped at ``max_bytes``.
The result is a deterministic JSONL file (``{"text": ...}`` per line) whose sha256 keys every
artifact derived from it (tokenizer, indexed dataset).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4_000_000
"""Default corpus size cap (UTF-8 bytes of document text)."""

# Directories whose content is tests, generated tables or tools rather than library prose/code.
_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "encodings",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "__pycache__",
    }
)


@dataclass(frozen=True)
class Corpus:
    """A built corpus file and its identity."""

    path: str
    sha256: str
    documents: int
    num_bytes: int


def default_cache_dir() -> str:
    """Cache root: ``$DISCO_CACHE_DIR`` if set, else ``~/.cache/disco_megatron``."""
    return os.environ.get("DISCO_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "disco_megatron"
    )


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _excluded(relative: Path) -> bool:
    return any(part in _EXCLUDED_DIRS or part.startswith("config-") for part in relative.parts[:-1])


def iter_stdlib_documents() -> Iterator[str]:
    """Yield the raw documents in their fixed order: reference topics, then library sources."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    root = Path(os.path.dirname(os.__file__))
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if _excluded(path.relative_to(root)) or not path.is_file():
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _corpus_paths(cache_dir: str, max_bytes: int) -> tuple[str, str]:
    tag = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{max_bytes}"
    base = os.path.join(cache_dir, "corpus", tag)
    return base + ".jsonl", base + ".meta.json"


def build_embedded_corpus(
    cache_dir: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Corpus:
    """Build (or reuse from cache) the embedded corpus; safe to call from several processes.

    Every caller that misses the cache builds the same bytes and renames them into place; the
    metadata file is written last, so its presence means the JSONL is complete.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}: the corpus size cap must be positive")
    cache_dir = cache_dir or default_cache_dir()
    jsonl_path, meta_path = _corpus_paths(cache_dir, max_bytes)
    if os.path.isfile(meta_path) and os.path.isfile(jsonl_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        return Corpus(jsonl_path, meta["sha256"], meta["documents"], meta["num_bytes"])

    logger.info("building embedded corpus (cap %d bytes) into %s", max_bytes, jsonl_path)
    start = time.perf_counter()
    lines: list[str] = []
    total = 0
    for text in iter_stdlib_documents():
        size = len(text.encode("utf-8"))
        if not text.strip() or total + size > max_bytes:
            continue
        lines.append(json.dumps({"text": text}, ensure_ascii=False))
        total += size
    if not lines:
        raise ValueError(f"max_bytes={max_bytes}: too small for any document; raise the cap")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(jsonl_path, data)
    meta = {"sha256": digest, "documents": len(lines), "num_bytes": total, "max_bytes": max_bytes}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode("utf-8"))
    logger.info(
        "embedded corpus: %d documents, %.2f MB, sha256 %s (%.1f s)",
        len(lines),
        total / 1e6,
        digest[:12],
        time.perf_counter() - start,
    )
    return Corpus(jsonl_path, digest, len(lines), total)


def read_jsonl_texts(path: str, key: str = "text") -> Iterator[str]:
    """Yield ``record[key]`` of every line of a JSONL file; errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such JSONL file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or key not in record:
                raise ValueError(
                    f"{path}:{number}: no key {key!r}; pass the right --json-keys"
                )
            yield str(record[key])
