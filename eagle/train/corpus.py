"""The training corpus of the bundled ``tiny-code`` target: the machine's own Python standard library.

Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except third-party packages, generated
tables and deliberately malformed test inputs. The split into train and validation is by file and
deterministic: a file is held out when a hash of its path relative to the root falls in the
validation fraction, so the same file is held out on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VAL_FRACTION = 0.03
DEFAULT_MAX_FILE_BYTES = 256 * 1024

# Directory names skipped anywhere below the root: installed third-party code, build configuration,
# caches, and test inputs that are deliberately malformed or are data rather than code.
EXCLUDED_DIR_NAMES = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib-dynload",
        "data",  # test fixtures (lib2to3 inputs with bad syntax, bad encodings, ...)
        "tokenizedata",
        "encoded_modules",
        "badsyntax",
    }
)
EXCLUDED_DIR_PREFIXES = ("config-",)  # config-3.11-x86_64-linux-gnu: build files, no library code

# Files whose content is generated tables rather than written code.
EXCLUDED_RELATIVE_PATHS = frozenset({"pydoc_data/topics.py"})
EXCLUDED_NAME_PREFIXES = ("_sysconfigdata", "badsyntax_", "bad_coding", "bad_getattr")
GENERATED_CODEC_DIR = "encodings"
GENERATED_CODEC_PREFIXES = ("cp", "mac_", "iso8859_", "koi8_", "hp_", "palmos", "ptcp", "tis_", "kz1048")


@dataclass(frozen=True)
class SourceFile:
    """One corpus document: its path relative to the corpus root and its text."""

    relpath: str
    text: str


def default_stdlib_root() -> Path:
    """The standard-library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation_path(relpath: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> bool:
    """Whether ``relpath`` belongs to the held-out split (a stable hash of the POSIX relative path)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _is_excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIR_NAMES or name.startswith(EXCLUDED_DIR_PREFIXES) or name.startswith(".")


def _is_generated_file(relpath: str) -> bool:
    parts = relpath.split("/")
    name = parts[-1]
    if relpath in EXCLUDED_RELATIVE_PATHS or name.startswith(EXCLUDED_NAME_PREFIXES):
        return True
    return len(parts) == 2 and parts[0] == GENERATED_CODEC_DIR and name.startswith(GENERATED_CODEC_PREFIXES)


def iter_source_paths(root: Path) -> Iterator[Path]:
    """Candidate ``.py`` files below ``root`` in sorted (deterministic) order, excluded dirs pruned."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and not entry.is_symlink():
            if not _is_excluded_dir(entry.name):
                yield from iter_source_paths(entry)
        elif entry.suffix == ".py" and entry.is_file():
            yield entry


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def collect_sources(
    root: Path | str | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> list[SourceFile]:
    """Read every corpus file below ``root`` (default: this Python's stdlib).

    Files that are not valid UTF-8, are empty, are larger than ``max_file_bytes`` or are generated
    tables are skipped. Raises ``FileNotFoundError`` when ``root`` does not exist and ``ValueError``
    when nothing usable is found, naming the root.
    """
    root = Path(root) if root is not None else default_stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {str(root)!r} is not a directory")
    sources = []
    for path in iter_source_paths(root):
        relpath = path.relative_to(root).as_posix()
        if _is_generated_file(relpath) or path.stat().st_size > max_file_bytes:
            continue
        text = _read_utf8(path)
        if text and text.strip():
            sources.append(SourceFile(relpath, text))
    if not sources:
        raise ValueError(
            f"corpus root {str(root)!r} holds no readable, non-empty UTF-8 .py file "
            f"(at most {max_file_bytes} bytes, outside {sorted(EXCLUDED_DIR_NAMES)})"
        )
    return sources


def split_sources(
    sources: Iterable[SourceFile], val_fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Split into (train, validation) by file. Raises ``ValueError`` if either side ends up empty."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for source in sources:
        (val if is_validation_path(source.relpath, val_fraction) else train).append(source)
    if not train or not val:
        raise ValueError(
            f"split of {len(train) + len(val)} files with val_fraction={val_fraction} left "
            f"{len(train)} training and {len(val)} validation files; need at least one of each"
        )
    return train, val


def corpus_bytes(sources: Iterable[SourceFile]) -> int:
    """Total UTF-8 size of the texts, the denominator of bits-per-byte."""
    return sum(len(s.text.encode("utf-8")) for s in sources)
