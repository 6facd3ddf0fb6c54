"""Where the evaluation data lives.

The benchmark files are never part of the project; they sit in a data directory that is found,
in this order:

1. an explicit argument (the CLI's ``--data-dir``),
2. the environment variable ``SPLITLLM_DATA``,
3. ``../shared/data`` relative to the current working directory,
4. ``../shared/data`` relative to the repository root (the directory holding the ``splitcli``
   package).

An explicit argument or ``SPLITLLM_DATA`` that names a missing directory is an error, not a
reason to fall back: a user who pointed somewhere meant it.
"""

from __future__ import annotations

import os
from pathlib import Path

from splitcli.errors import SplitLLMError

DATA_ENV = "SPLITLLM_DATA"
CACHE_ENV = "SPLITLLM_CACHE"


def cache_root() -> Path:
    """Where splitllm keeps what it builds once per user (converted models, codec calibrations,
    eval results, compiled kernels): $SPLITLLM_CACHE, else $XDG_CACHE_HOME/splitllm, else
    ~/.cache/splitllm."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitllm"

#: WikiText-2's raw test split: perplexity, codec calibration and the planner's proxy read it.
WIKITEXT2_TEST = "wikitext2/wiki.test.raw"

_HOW_TO_GET = (
    f"set {DATA_ENV} or pass --data-dir to a directory holding the benchmark files "
    "(the data directory's README.md lists the files and their public sources)"
)


def default_data_dirs() -> list[Path]:
    """The implicit candidates, in search order (cwd first, then the repository root)."""
    repo_root = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]
    seen: list[Path] = []
    for c in candidates:
        c = c.resolve()
        if c not in seen:
            seen.append(c)
    return seen


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory (explicit > $SPLITLLM_DATA > ../shared/data), or raise."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise SplitLLMError(f"data directory {path} does not exist; {_HOW_TO_GET}")
        return path
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SplitLLMError(f"{DATA_ENV}={env} is not a directory; {_HOW_TO_GET}")
        return path
    candidates = default_data_dirs()
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise SplitLLMError(f"no evaluation data directory found (tried {tried}); {_HOW_TO_GET}")


def data_file(relative: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve one data file (relative to the data directory, or absolute) and check it exists."""
    rel = Path(relative).expanduser()
    if rel.is_absolute():
        path = rel
    else:
        path = resolve_data_dir(data_dir) / rel
    if not path.is_file():
        raise SplitLLMError(f"evaluation data file {path} not found; {_HOW_TO_GET}")
    return path


def read_text(path: Path, normalize_newlines: bool = True) -> str:
    """A UTF-8 text file; line ends read as LF unless `normalize_newlines` is off.

    The shipped WikiText-2 file has CRLF line ends, while the published numbers (GPTQ, Atom) are
    computed on the Hugging Face text, whose lines end in LF. Kept as bytes, every line would add
    a "\r" token (304,839 tokens instead of 301,948 with SmolLM2's tokenizer, and a different ppl).
    """
    return decode_text(Path(path).read_bytes(), path, normalize_newlines)


def decode_text(raw: bytes, path, normalize_newlines: bool = True) -> str:
    """`read_text` of bytes already read (from `path`, named in the error): a caller that also
    hashes the file reads it once, so the text and the hash are of the same bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SplitLLMError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if normalize_newlines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text
