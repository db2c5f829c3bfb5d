"""Tokenizers: any tiktoken encoding, a local `.tiktoken` file, or a character vocabulary.

A tokenizer is described by a small JSON-able spec (stored in the data's meta.json and in every
exported model), from which `Tokenizer.from_spec` rebuilds it anywhere.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UsageError, closest

CHAR = "char"


def tiktoken_names() -> list[str]:
    import tiktoken

    return list(tiktoken.list_encoding_names())


def valid_encodings_hint() -> str:
    return f"{', '.join([*tiktoken_names(), CHAR])}, or a path to a .tiktoken file"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """encode / decode / vocab_size over one of the three kinds of tokenizer."""

    def __init__(self, spec: dict[str, Any], encoding: Any = None, chars: str | None = None) -> None:
        self.spec = spec
        self._enc = encoding
        self._chars = chars
        if chars is not None:
            self._stoi = {c: i for i, c in enumerate(chars)}
            codes = np.array([ord(c) for c in chars], dtype=np.uint32)
            self._order = np.argsort(codes)
            self._sorted_codes = codes[self._order]

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Tokenizer:
        kind = spec["encoding"]
        if kind == CHAR:
            return cls(spec, chars=spec["chars"])
        if kind == "tiktoken_file":
            path = Path(spec["path"])
            _check_recorded_file(path, spec.get("sha256"))
            return cls(spec, encoding=_load_tiktoken_file(path, spec["pattern_from"]))
        return cls(spec, encoding=_get_tiktoken(kind))

    @classmethod
    def build(
        cls, encoding: str, pattern_from: str = "cl100k_base", train_text: Iterable[str] = ()
    ) -> Tokenizer:
        """A tokenizer from the CLI's --encoding value; `char` builds its vocabulary from `train_text`."""
        if encoding == CHAR:
            seen: set[str] = set()
            for piece in train_text:
                seen.update(piece)
            return cls.char(sorted(seen))
        if encoding.endswith(".tiktoken") or os.path.sep in encoding:
            path = Path(encoding).expanduser().resolve()
            if not path.is_file():
                raise UsageError(f"tiktoken file {path} does not exist; pass an existing .tiktoken file")
            spec = {
                "encoding": "tiktoken_file",
                "path": str(path),
                "sha256": file_sha256(path),
                "pattern_from": pattern_from,
            }
            return cls(spec, encoding=_load_tiktoken_file(path, pattern_from))
        return cls({"encoding": encoding}, encoding=_get_tiktoken(encoding))

    @classmethod
    def char(cls, chars: Sequence[str]) -> Tokenizer:
        text = "".join(chars)
        return cls({"encoding": CHAR, "chars": text}, chars=text)

    # -- properties ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Short name used in folder names: the encoding, the file's stem, or 'char'."""
        if self.spec["encoding"] == "tiktoken_file":
            return Path(self.spec["path"]).stem
        return self.spec["encoding"]

    @property
    def vocab_size(self) -> int:
        return len(self._chars) if self._chars is not None else int(self._enc.n_vocab)

    @property
    def eot(self) -> int | None:
        """End-of-text id separating documents, when the tokenizer has one."""
        return None if self._enc is None else self._enc.eot_token

    # -- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self._chars is not None:
            try:
                return [self._stoi[c] for c in text]
            except KeyError as err:
                raise UsageError(
                    f"character {err.args[0]!r} is not in this char vocabulary of {len(self._chars)} symbols"
                ) from None
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids as a uint32 array, with no Python int per token (the tokenize stage's path)."""
        if self._chars is None:
            # disallowed_special=() treats special-token text as ordinary text, like encode_ordinary.
            return self._enc.encode_to_numpy(text, disallowed_special=()).astype(np.uint32, copy=False)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._sorted_codes) - 1)
        missing = self._sorted_codes[pos] != codes
        if missing.any():
            self.encode(chr(int(codes[np.argmax(missing)])))  # raises with the character named
        return self._order[pos].astype(np.uint32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = [int(i) for i in ids]
        if self._chars is not None:
            return "".join(self._chars[i] for i in ids)
        return self._enc.decode(ids, errors="replace")

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Readable label of each id (for embedding projectors and reports)."""
        if self._chars is not None:
            return [repr(self._chars[int(i)])[1:-1] for i in ids]
        out = []
        for i in ids:
            raw = self._enc.decode_single_token_bytes(int(i))
            out.append(repr(raw.decode("utf-8", errors="replace"))[1:-1])
        return out


def check_encodable(tokenizer: Tokenizer, text: str, flag: str) -> None:
    """Refuse `text`, the value of `flag`, at start-up when `tokenizer` cannot encode it.

    Only a char vocabulary can lack characters; tiktoken's byte-level BPE encodes any text.
    """
    if tokenizer._chars is None:
        return
    known = set(tokenizer._chars)
    missing = "".join(sorted({c for c in text if c not in known}))
    if missing:
        raise UsageError(
            f"{flag}={text!r} has characters that the data's char vocabulary of {len(known)} symbols "
            f"lacks: {missing!r}; pass a {flag} written in the corpus's characters"
        )


def _check_recorded_file(path: Path, sha256: str | None) -> None:
    """A spec's .tiktoken file must still be the one it recorded: ids mean nothing under another."""
    fix = "put the original file back at that path, or re-tokenize (and retrain) with the file you have"
    if not path.is_file():
        raise UsageError(f"the tokenizer file {path} recorded in the tokenizer spec is missing; {fix}")
    if sha256 is not None and (found := file_sha256(path)) != sha256:
        raise UsageError(
            f"the tokenizer file {path} changed since it was recorded (sha256 {found[:12]}…, "
            f"recorded {sha256[:12]}…); {fix}"
        )


def _get_tiktoken(name: str) -> Any:
    import tiktoken

    names = tiktoken_names()
    if name not in names:
        raise UsageError(
            f"unknown encoding '{name}'{closest(name, [*names, CHAR])}; valid: {valid_encodings_hint()}"
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as err:
        raise UsageError(
            f"could not load tiktoken encoding '{name}' ({type(err).__name__}: {err}). Offline? Point "
            f"TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached files (README: Offline use)"
        ) from err


def _load_tiktoken_file(path: Path, pattern_from: str) -> Any:
    """A tiktoken Encoding from a local .tiktoken rank file, with the split regex of `pattern_from`."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as err:
        raise UsageError(f"{path} is not a readable .tiktoken file ({type(err).__name__}: {err})") from err
    base = _get_tiktoken(pattern_from)
    if base._mergeable_ranks == ranks:
        specials = dict(base._special_tokens)
    else:
        specials = {"<|endoftext|>": len(ranks)}
    return tiktoken.Encoding(
        name=f"file:{path.stem}", pat_str=base._pat_str, mergeable_ranks=ranks, special_tokens=specials
    )
