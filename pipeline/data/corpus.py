"""Corpus sources: Tiny Shakespeare (downloaded once and checked), local text, Hugging Face datasets.

A source yields *pieces* of text tagged with their split. Pieces are cut only where a tokenizer's
pre-tokenization cannot merge across the cut, so encoding pieces one by one (in parallel, with
bounded memory) gives exactly the ids of encoding the whole text at once.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import TokenizeConfig
from pipeline.errors import UsageError
from pipeline.files import ENV_CACHE, cache_dir  # noqa: F401 (ENV_CACHE: the variable, for callers)

TINYSHAKESPEARE = "tinyshakespeare"
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENV_TINYSHAKESPEARE = "TINYSHAKESPEARE_PATH"
"""Environment variable naming a local copy of Tiny Shakespeare (checked against the sha256)."""

READ_BLOCK = 1 << 22  # bytes read per file access
PIECE_CHARS = 1 << 20  # target size of a piece handed to the tokenizer


@dataclass
class Piece:
    split: str  # "train" or "val"
    text: str
    doc_end: bool  # the piece ends a document (an end-of-text id follows in multi-document corpora)


@dataclass
class Source:
    """A resolved corpus: what it is, its content hash, and how to read it."""

    name: str
    description: str
    kind: str  # "text" (one document), "files" (one document per file) or "hf"
    files: list[Path] = field(default_factory=list)
    sha256: str | None = None
    n_bytes: int = 0
    n_chars: int = 0
    hf_args: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_document(self) -> bool:
        return self.kind != "text"


# --------------------------------------------------------------------------------------------------
# Tiny Shakespeare
# --------------------------------------------------------------------------------------------------


def tinyshakespeare_file(url: str = TINYSHAKESPEARE_URL) -> Path:
    """Local path of Tiny Shakespeare: $TINYSHAKESPEARE_PATH, else the cache, else a fresh download."""
    local = os.environ.get(ENV_TINYSHAKESPEARE)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise UsageError(f"{ENV_TINYSHAKESPEARE}={local} does not exist; point it at tinyshakespeare.txt")
        _check_sha256(path, TINYSHAKESPEARE_SHA256, f"{ENV_TINYSHAKESPEARE}={local}")
        return path
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file():
        _check_sha256(cached, TINYSHAKESPEARE_SHA256, f"cached copy {cached} (delete it to download again)")
        return cached
    download(url, cached, TINYSHAKESPEARE_SHA256)
    return cached


def download(url: str, dest: Path, sha256: str) -> None:
    """Download `url` to `dest` atomically, refusing content whose sha256 differs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        _check_sha256(Path(tmp), sha256, f"download from {url}")
        os.replace(tmp, dest)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(
            f"could not download {url} ({type(err).__name__}: {err}). Offline? Set "
            f"{ENV_TINYSHAKESPEARE}=/path/to/tinyshakespeare.txt or pass --input /path/to/file.txt"
        ) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise UsageError(f"{what} has sha256 {digest}, expected {expected}: the file is not Tiny Shakespeare")


# --------------------------------------------------------------------------------------------------
# Resolving an --input value
# --------------------------------------------------------------------------------------------------


def source_name(spec: str, hf_config: str = "") -> str:
    """Short name of an --input value, used in default folder names (data/<name>-<encoding>)."""
    spec = spec.strip()
    if spec.startswith("hf:"):
        return spec[3:].replace("/", "_") + (f"_{hf_config}" if hf_config else "")
    path = Path(os.path.expanduser(spec).rstrip("/"))
    name = path.name if path.is_dir() else path.stem
    return name.replace("*", "").replace("?", "").strip("._-") or "corpus"


def resolve(cfg: TokenizeConfig) -> Source:
    spec = cfg.input.strip()
    name = source_name(spec, cfg.hf_config)
    if spec == TINYSHAKESPEARE:
        path = tinyshakespeare_file()
        return _scan(Source(name, f"Tiny Shakespeare ({TINYSHAKESPEARE_URL})", "text", [path]))
    if spec.startswith("hf:"):
        return _hf_source(cfg, spec[3:], name)
    files = _local_files(spec)
    return _scan(Source(name, spec, "text" if len(files) == 1 else "files", files))


def content_sha256(spec: str) -> str | None:
    """The content hash `resolve` gives the --input `spec`, without decoding or counting its text;
    None for a dataset (hf:) or local files that are not there."""
    spec = spec.strip()
    if spec == TINYSHAKESPEARE:
        return TINYSHAKESPEARE_SHA256  # a copy is only ever used once it matches
    if spec.startswith("hf:"):
        return None
    try:
        files = _local_files(spec)
    except UsageError:
        return None
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as fh:
            while block := fh.read(READ_BLOCK):
                digest.update(block)
        if len(files) > 1:
            digest.update(b"\0")  # as _scan: file boundaries are part of the content
    return digest.hexdigest()


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UsageError(f"folder {path} holds no files; point --input at text files")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(
            Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()
        )
        if not files:
            raise UsageError(f"glob {spec!r} matches no files; check the pattern")
        return files
    raise UsageError(
        f"input {spec!r} does not exist; pass 'tinyshakespeare', a text file, a folder, a glob or hf:NAME"
    )


def _scan(source: Source) -> Source:
    """Hash the files, count bytes and characters, and check that they are UTF-8 text."""
    digest = hashlib.sha256()
    for path in source.files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with path.open("rb") as fh:
            while block := fh.read(READ_BLOCK):
                digest.update(block)
                source.n_chars += len(_decode(decoder, block, path, offset))
                offset += len(block)
            _decode(decoder, b"", path, offset, final=True)
        source.n_bytes += offset
        if source.kind == "files":
            digest.update(b"\0")  # file boundaries are part of the content
    if source.n_chars == 0:
        raise UsageError(f"corpus {source.description} is empty; point --input at a file with text in it")
    source.sha256 = digest.hexdigest()
    return source


def _decode(decoder: Any, block: bytes, path: Path, offset: int, final: bool = False) -> str:
    try:
        return decoder.decode(block, final)
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{path} is not UTF-8 text (byte 0x{block[err.start]:02x} at offset {offset + err.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path}.utf8, or pass another file"
        ) from None


def _hf_source(cfg: TokenizeConfig, dataset: str, name: str) -> Source:
    if not dataset:
        raise UsageError("hf: needs a dataset name, e.g. --input hf:roneneldan/TinyStories")
    args: dict[str, Any] = {"path": dataset, "name": cfg.hf_config or None, "streaming": cfg.streaming}
    if cfg.hf_data_files:
        args["data_files"] = _data_files(cfg.hf_data_files)
    return Source(name, f"hf:{dataset}", "hf", hf_args=args)


def _data_files(entries: tuple[str, ...]) -> list[str] | dict[str, str]:
    """FILE ... (all in the train split) or SPLIT=FILE ... (one entry per split)."""
    if all("=" in e for e in entries):
        return dict(e.split("=", 1) for e in entries)
    if any("=" in e for e in entries):
        raise UsageError("--hf-data-files: give either FILE ... or SPLIT=FILE ..., not a mix")
    return list(entries)


def _open_hf_split(source: Source, split: str, column: str) -> tuple[Any, str | None]:
    import datasets

    try:
        ds = datasets.load_dataset(split=split, **source.hf_args)
    except Exception as err:
        raise UsageError(
            f"could not load Hugging Face dataset {source.description} split {split!r} "
            f"({type(err).__name__}: {err})"
        ) from err
    columns = list(ds.column_names or [])
    if columns and column not in columns:
        raise UsageError(
            f"dataset {source.description} has no column {column!r}; pass --text-column one of {columns}"
        )
    fingerprint = getattr(ds, "_fingerprint", None)
    return ds, fingerprint


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def pieces(source: Source, cfg: TokenizeConfig) -> Iterator[Piece]:
    """The corpus as safely cut pieces, each tagged train or val (see the module docstring)."""
    if source.kind == "text":
        yield from _single_document(source, cfg.val_fraction)
    elif source.kind == "files":
        yield from _file_documents(source, cfg)
    else:
        yield from _hf_documents(source, cfg)


def _single_document(source: Source, val_fraction: float) -> Iterator[Piece]:
    # nanoGPT's rule: the first int(n * 0.9) characters are train, the rest val.
    n_train = int(source.n_chars * (1.0 - val_fraction))
    seen = 0
    for text in _read_text(source.files[0]):
        if seen < n_train <= seen + len(text):
            cut = n_train - seen
            yield from _cut("train", text[:cut], True)
            text, seen = text[cut:], n_train
            if not text:
                continue
        split = "train" if seen < n_train else "val"
        seen += len(text)
        yield from _cut(split, text, False)


def _read_text(path: Path) -> Iterator[str]:
    """The file's text in blocks of about PIECE_CHARS, each ending at a safe cut where possible."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with path.open("rb") as fh:
        while block := fh.read(READ_BLOCK):
            carry += decoder.decode(block)
            while len(carry) >= PIECE_CHARS:
                cut = safe_cut(carry, PIECE_CHARS)
                yield carry[:cut]
                carry = carry[cut:]
    carry += decoder.decode(b"", True)
    if carry:
        yield carry


def safe_cut(text: str, target: int) -> int:
    """An index near `target` where tiktoken's pre-tokenizers (gpt2 .. o200k) cannot merge across.

    After a lone newline between a non-space and a letter, every pattern ends the pre-token at the
    newline and starts a new one at the letter (a run of whitespace must not be cut: gpt2's
    pattern merges trailing whitespace at the end of a piece). Failing that, before a single space
    between two letters. With neither, cut at `target` (exactness is lost only at that cut).
    """
    limit = min(len(text) - 1, target)
    for i in range(limit, 1, -1):
        if text[i - 1] == "\n" and text[i].isalpha() and not text[i - 2].isspace():
            return i
    for i in range(limit, 1, -1):
        if text[i] == " " and text[i - 1].isalpha() and text[i + 1 : i + 2].isalpha():
            return i
    return max(limit, 1)


def _cut(split: str, text: str, doc_end: bool) -> Iterator[Piece]:
    while len(text) > 2 * PIECE_CHARS:
        cut = safe_cut(text, PIECE_CHARS)
        yield Piece(split, text[:cut], False)
        text = text[cut:]
    yield Piece(split, text, doc_end)


def document_split(index: int, seed: int, val_fraction: float) -> str:
    """Seeded, order-independent train/val assignment of document `index`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def _balanced_splits(n: int, seed: int, val_fraction: float) -> list[str]:
    splits = [document_split(i, seed, val_fraction) for i in range(n)]
    if n >= 2 and "val" not in splits:
        splits[-1] = "val"
    if n >= 2 and "train" not in splits:
        splits[0] = "train"
    return splits


def _file_documents(source: Source, cfg: TokenizeConfig) -> Iterator[Piece]:
    splits = _balanced_splits(len(source.files), cfg.split_seed, cfg.val_fraction)
    for path, split in zip(source.files, splits):
        texts = list(_read_text(path)) or [""]
        for i, text in enumerate(texts):
            yield Piece(split, text, i == len(texts) - 1)


def _hf_documents(source: Source, cfg: TokenizeConfig) -> Iterator[Piece]:
    train, fp_train = _open_hf_split(source, cfg.hf_split, cfg.text_column)
    fingerprints = [fp_train]
    if cfg.hf_val_split:
        val, fp_val = _open_hf_split(source, cfg.hf_val_split, cfg.text_column)
        fingerprints.append(fp_val)
    source.sha256 = (
        None if None in fingerprints else hashlib.sha256("|".join(fingerprints).encode()).hexdigest()
    )
    for i, row in enumerate(train):
        split = "train" if cfg.hf_val_split else document_split(i, cfg.split_seed, cfg.val_fraction)
        yield from _cut(split, _text(row[cfg.text_column]), True)
    if cfg.hf_val_split:
        for row in val:
            yield from _cut("val", _text(row[cfg.text_column]), True)


def _text(value: Any) -> str:
    return "" if value is None else str(value)
