"""The tokenize stage: a corpus in, `train.bin`, `val.bin` and `meta.json` out.

Shards are flat arrays of token ids (uint16 when the vocabulary fits, uint32 otherwise). Every file
is written under a temporary name and renamed into place, meta.json last, so an interrupted run never
leaves shards that a later stage would accept. The same settings reuse an existing output; other
settings refuse to touch it unless `overwrite` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import TokenizeConfig
from pipeline.data import corpus
from pipeline.data.shards import TokenData
from pipeline.data.tokenizer import CHAR, Tokenizer
from pipeline.errors import UsageError
from pipeline.files import environment, write_json, writing

META = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
DATA_ROOT_ENV = "GPT_DISTILL_DATA"
"""Environment variable naming the folder that default data folders go in (default ./data)."""


def data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data"))


def default_out(cfg: TokenizeConfig) -> Path:
    """data/<corpus>-<encoding>: where a tokenization goes when --out is not given."""
    encoding = Path(cfg.encoding).stem if cfg.encoding.endswith(".tiktoken") else cfg.encoding
    return data_root() / f"{corpus.source_name(cfg.input, cfg.hf_config)}-{encoding}"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize(cfg: TokenizeConfig, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Run the tokenize stage; returns the output folder (reused when already up to date)."""
    tokenizer = None if cfg.encoding == CHAR else Tokenizer.build(cfg.encoding, cfg.pattern_from)
    source = corpus.resolve(cfg)
    if tokenizer is None:
        tokenizer = Tokenizer.char(_train_chars(source, cfg))
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    settings = _settings(cfg, source, tokenizer)

    existing = _read_meta(out)
    if existing is not None and existing.get("settings") == settings:
        damage = _damage(out)
        if damage is None:
            log(
                f"{out} already holds this tokenization ({existing['train_tokens']:,} train tokens); reusing it"
            )
            return out
        if not cfg.overwrite:
            raise UsageError(f"{out} holds this tokenization, damaged: {damage}")
    if existing is not None and not cfg.overwrite:
        raise UsageError(
            f"{out} holds another tokenization ({_describe(existing)}); pass --overwrite to replace it "
            f"or choose another --out"
        )
    if existing is None and out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise UsageError(f"{out} exists and holds files that are not a tokenization; choose another --out")

    with writing(out, "the data folder"):
        out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = _write_shards(cfg, source, tokenizer, out, settings, progress)
    seconds = time.perf_counter() - start
    size = meta["train_bytes"] + meta["val_bytes"]
    log(
        f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
        f"({tokenizer.name}, vocab {tokenizer.vocab_size:,}, {meta['dtype']}) "
        f"in {seconds:.1f} s, {size / seconds / 1e6:.1f} MB/s"
    )
    return out


def prepare_default(cfg: TokenizeConfig, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The default folder of `cfg` (data/<name>-<encoding>) for one process: tokenized when missing,
    else checked to hold this corpus's text (`check_reuse`; training stages run the two steps apart,
    see stage.prepare_data)."""
    out = default_out(cfg)
    if not (out / META).is_file():
        log(f"{out} is missing: running the tokenize stage first")
        return tokenize(cfg, log=log, progress=progress)
    check_reuse(cfg, out)
    return out


def check_reuse(cfg: TokenizeConfig, out: Path) -> None:
    """Refuse a default folder whose tokenization came from another text than cfg.input's. Default
    folders are named by the corpus's file name alone, so `a/input.txt` and `b/input.txt`, or a file
    edited since, would otherwise share one silently."""
    meta = _read_meta(out) or {}
    made_from = (meta.get("settings") or {}).get("source_sha256")
    asked = corpus.content_sha256(cfg.input)
    if made_from and asked and made_from != asked:
        source = (meta.get("source") or {}).get("description", "?")
        other = "an earlier version of it" if source == cfg.input else source
        raise UsageError(
            f"{out} holds a tokenization of another text ({other}, sha256 {made_from[:12]}...) "
            f"than {cfg.input} (sha256 {asked[:12]}...): default folders are named by the "
            f"file name alone. Tokenize it into a folder of its own (python recipes/tokenize.py --input "
            f"{cfg.input} --encoding {cfg.encoding} --out DIR) and pass --data DIR, or remove {out} to remake it"
        )


def _train_chars(source: corpus.Source, cfg: TokenizeConfig) -> list[str]:
    """The char vocabulary: characters of the train split, then any found only in val."""
    train: set[str] = set()
    val: set[str] = set()
    for piece in corpus.pieces(source, cfg):
        (train if piece.split == "train" else val).update(piece.text)
    return sorted(train) + sorted(val - train)


def _settings(cfg: TokenizeConfig, source: corpus.Source, tokenizer: Tokenizer) -> dict[str, Any]:
    spec = {k: v for k, v in tokenizer.spec.items() if k != "chars"}
    # The content's hash names the corpus whatever the spelling of --input (tinyshakespeare or a
    # local copy of it); only sources without a hash (streamed datasets) are named by the spelling.
    settings: dict[str, Any] = {
        "input": cfg.input if source.sha256 is None else None,
        "tokenizer": spec,
        "val_fraction": cfg.val_fraction,
        "source_sha256": source.sha256,
    }
    if source.multi_document:
        settings["split_seed"] = cfg.split_seed
    if source.kind == "hf":
        settings["hf"] = {
            "config": cfg.hf_config,
            "split": cfg.hf_split,
            "val_split": cfg.hf_val_split,
            "data_files": list(cfg.hf_data_files),
            "text_column": cfg.text_column,
        }
    return settings


def _describe(meta: dict[str, Any]) -> str:
    settings = meta.get("settings", {})
    return f"input {settings.get('input')!r}, encoding {meta.get('encoding')!r}"


def _read_meta(out: Path) -> dict[str, Any] | None:
    path = out / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"settings": None, "encoding": "unreadable meta.json"}


def _damage(out: Path) -> str | None:
    """Why a finished tokenization in `out` cannot be reused (the data-folder validator's word), or None."""
    try:
        TokenData.open(out)
    except UsageError as err:
        return str(err)
    return None


def _batches(pieces: Iterable[corpus.Piece], size: int) -> Iterator[list[corpus.Piece]]:
    batch: list[corpus.Piece] = []
    for piece in pieces:
        batch.append(piece)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_shards(
    cfg: TokenizeConfig,
    source: corpus.Source,
    tokenizer: Tokenizer,
    out: Path,
    settings: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    dtype = dtype_for(tokenizer.vocab_size)
    threads = cfg.num_proc or os.cpu_count() or 1
    tmp = {s: out / f".{s}.bin.tmp-{os.getpid()}" for s in SPLITS}
    meta_tmp = out / f".{META}.tmp-{os.getpid()}"
    handles: dict[str, Any] = {}
    bar = tqdm(total=source.n_bytes or None, unit="B", unit_scale=True, desc="tokenize", disable=not progress)

    # A failed write (disk full, read-only folder) removes the temporary files and raises a
    # WriteError naming the shard; a previous tokenization in `out` keeps its meta.json and shards.
    # Only the writes are wrapped: a failed read of the corpus is no write failure.
    def written(name: str) -> contextlib.AbstractContextManager[None]:
        return writing(out / name, "the tokenized data")

    try:
        for split in SPLITS:
            with written(f"{split}.bin"):
                handles[split] = tmp[split].open("wb")
        tokens, n_bytes, counts = _encode_pieces(cfg, source, tokenizer, handles, written, bar)
        for split, handle in handles.items():
            with written(f"{split}.bin"):
                handle.close()
        for split in SPLITS:
            if tokens[split] == 0:
                raise UsageError(
                    f"corpus {source.description} gives no {split} tokens; it is too small or empty for a "
                    f"{cfg.val_fraction:.0%} validation split"
                )
        meta = _meta(cfg, source, tokenizer, settings, dtype, tokens, n_bytes, counts)
        with written(META):
            meta_tmp.write_text(json.dumps(meta, indent=1))
        # Like every stage's run folder: the resolved settings and where they ran.
        env = environment(f"cpu: {os.cpu_count()} cores, {threads} threads", 1, "no")
        write_json(out / "config.json", dataclasses.asdict(cfg), "the tokenize config")
        write_json(out / "env.json", env, "the tokenize environment")
        with written(META):
            _publish(out, tmp, meta_tmp)
        return meta
    finally:
        bar.close()
        for handle in handles.values():
            with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails again
                handle.close()
        for split in SPLITS:
            tmp[split].unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)


def _encode_pieces(
    cfg: TokenizeConfig,
    source: corpus.Source,
    tokenizer: Tokenizer,
    handles: dict[str, Any],
    written: Callable[[str], contextlib.AbstractContextManager[None]],
    bar: tqdm,
) -> tuple[dict[str, int], dict[str, int], np.ndarray]:
    """Encode the corpus's pieces on worker threads into the open shard files: (tokens, bytes, train id counts)."""
    dtype = dtype_for(tokenizer.vocab_size)
    threads = cfg.num_proc or os.cpu_count() or 1
    tokens = dict.fromkeys(SPLITS, 0)
    n_bytes = dict.fromkeys(SPLITS, 0)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    eot = tokenizer.eot if source.multi_document else None
    with ThreadPoolExecutor(threads) as pool:
        for batch in _batches(corpus.pieces(source, cfg), 4 * threads):
            for piece, ids in zip(batch, pool.map(tokenizer.encode_array, [p.text for p in batch])):
                if eot is not None and piece.doc_end:
                    ids = np.append(ids, eot)
                with written(f"{piece.split}.bin"):
                    handles[piece.split].write(ids.astype(dtype).tobytes())
                if piece.split == "train":
                    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
                size = len(piece.text.encode("utf-8"))
                tokens[piece.split] += len(ids)
                n_bytes[piece.split] += size
                bar.update(size)
    return tokens, n_bytes, counts


def _publish(out: Path, tmp: dict[str, Path], meta_tmp: Path) -> None:
    """Rename the finished shards into place: meta.json goes first and comes back last, so in between
    no state of the folder passes validation."""
    (out / META).unlink(missing_ok=True)
    for split in SPLITS:
        os.replace(tmp[split], out / f"{split}.bin")
    os.replace(meta_tmp, out / META)


def _meta(
    cfg: TokenizeConfig,
    source: corpus.Source,
    tokenizer: Tokenizer,
    settings: dict[str, Any],
    dtype: np.dtype,
    tokens: dict[str, int],
    n_bytes: dict[str, int],
    counts: np.ndarray,
) -> dict[str, Any]:
    used = np.flatnonzero(counts)
    if source.kind == "text":
        split = {"rule": "characters", "val_fraction": cfg.val_fraction, "train": "first share of characters"}
    elif cfg.hf_val_split:
        split = {"rule": "dataset splits", "train": cfg.hf_split, "val": cfg.hf_val_split}
    else:
        split = {"rule": "documents", "val_fraction": cfg.val_fraction, "seed": cfg.split_seed}
    return {
        "format": FORMAT_VERSION,
        "encoding": tokenizer.spec["encoding"]
        if tokenizer.spec["encoding"] != "tiktoken_file"
        else tokenizer.name,
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "train_bytes": n_bytes["train"],
        "val_bytes": n_bytes["val"],
        "source": {
            "input": cfg.input,
            "name": source.name,
            "description": source.description,
            "sha256": source.sha256,
        },
        "split": split,
        "documents_separated_by": None if not source.multi_document else tokenizer.eot,
        "settings": settings,
        "distinct_train_ids": len(used),
        "token_counts": {"ids": used.tolist(), "counts": counts[used].tolist()},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
