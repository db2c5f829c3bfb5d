"""An offline teacher cache: the teacher's top-k log-probabilities for every training position.

Computed once (by the main process, in fp32) for the windows of a fixed grid over the train split
(window w = tokens [w * T, w * T + T + 1), pipeline/data/shards.py's sampling="grid"), and stored as safetensors shards
next to the data:

    <data>/teacher_cache/<key>/meta.json            what it was built from, and its size
    <data>/teacher_cache/<key>/shard_00000.safetensors
        ids   (W, T, k)  int16 (int32 past 32,767 classes)   the teacher's top-k classes
        logp  (W, T, k)  float16                              their log-probs at temperature T
        tail  (W, T)     float32                              log of the remaining mass, in fp32 so that
                                                              a tail near zero keeps its precision

The key is a hash of the teacher's weights and vocabulary map, the train split's bytes, the window
length, k and the temperature; a cache built from anything else is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import Tensor

from pipeline.data.shards import TokenData, windows
from pipeline.data.tokenizer import file_sha256
from pipeline.distill.divergences import teacher_topk
from pipeline.errors import UsageError
from pipeline.files import write_json
from pipeline.run.checkpoint import WEIGHTS, Export
from pipeline.train.losses import chunk_rows, chunked_logits

FORMAT = 1
META = "meta.json"
WINDOWS_PER_SHARD = 256
BUILD_BATCH = 16  # windows per teacher forward while building


def fingerprint(
    export: Export, data: TokenData, seq_len: int, top_k: int, temperature: float
) -> dict[str, Any]:
    """What a cache is built from; its hash names the cache."""
    vocab = json.dumps(export.vocab.to_json(), sort_keys=True).encode()
    fields = {
        "format": FORMAT,
        "teacher_sha256": file_sha256(export.path / WEIGHTS),
        "vocab_sha256": hashlib.sha256(vocab).hexdigest(),
        "data_sha256": file_sha256(data.dir / "train.bin"),
        "seq_len": seq_len,
        "top_k": top_k,
        "temperature": temperature,
    }
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return fields


def cache_dir(data: TokenData, key: dict[str, Any], override: str = "") -> Path:
    return Path(override) if override else data.dir / "teacher_cache" / key["key"]


class TeacherCache:
    """Reads the cached rows of a batch of grid windows."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def open(cls, path: Path, key: dict[str, Any]) -> TeacherCache:
        meta_path = path / META
        if not meta_path.is_file():
            raise UsageError(
                f"{path} is not a finished teacher cache (no {META}); delete it or pass another --kd.cache-dir"
            )
        meta = json.loads(meta_path.read_text())
        diffs = [f"{k}: cached {meta.get(k)!r}, now {v!r}" for k, v in key.items() if meta.get(k) != v]
        if diffs:
            raise UsageError(
                f"teacher cache {path} was built from another teacher, data or settings ({'; '.join(diffs)}); "
                f"delete it or pass another --kd.cache-dir"
            )
        return cls(path, meta)

    @property
    def nbytes(self) -> int:
        return int(self.meta["bytes"])

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._shards:
            self._shards[index] = memmap_safetensors(self.path / f"shard_{index:05d}.safetensors")
        return self._shards[index]

    def rows(self, window_ids: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """(ids (B, T, k) int64, logp (B, T, k) float32, tail (B, T) float32) of grid windows `window_ids`."""
        shard, offset = np.divmod(np.asarray(window_ids, dtype=np.int64), WINDOWS_PER_SHARD)
        out = {}
        for name in ("ids", "logp", "tail"):
            first = self._shard(int(shard[0]))[name]
            rows = np.empty((len(shard), *first.shape[1:]), dtype=first.dtype)
            for s in np.unique(shard):
                rows[shard == s] = self._shard(int(s))[name][offset[shard == s]]
            out[name] = torch.from_numpy(rows)
        return out["ids"].long(), out["logp"].float(), out["tail"]


SAFETENSORS_DTYPES = {"I16": np.int16, "I32": np.int32, "F16": np.float16, "F32": np.float32}


def memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map (8-byte header size, JSON header, data)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {
        name: np.memmap(
            path,
            dtype=SAFETENSORS_DTYPES[info["dtype"]],
            mode="r",
            offset=8 + size + info["data_offsets"][0],
            shape=tuple(info["shape"]),
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


def locate(
    export: Export, data: TokenData, seq_len: int, top_k: int, temperature: float, override: str = ""
) -> tuple[Path, dict[str, Any]]:
    """The cache folder and its key, before any work: a cache there built from anything else is refused."""
    key = fingerprint(export, data, seq_len, top_k, temperature)
    path = cache_dir(data, key, override)
    if (path / META).is_file():
        TeacherCache.open(path, key)
    elif path.exists() and any(path.iterdir()):
        raise UsageError(f"{path} exists and is not a teacher cache; pass an empty or new --kd.cache-dir")
    return path, key


def prepare(
    accelerator: Accelerator,
    path: Path,
    key: dict[str, Any],
    export: Export,
    data: TokenData,
    log=print,
) -> TeacherCache:
    """Open the cache at `path` (see `locate`), building it first (main process) when it does not exist.

    The export's model is the frozen teacher, already on the run's device.
    """
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (path / META).is_file():
            log(
                f"building the teacher cache in {path} (top-{key['top_k']} log-probs of every training position)"
            )
            build(path, export.model, data, export, key, accelerator.device)
    cache = TeacherCache.open(path, key)
    log(
        f"teacher cache: {path} ({cache.nbytes / 2**20:,.1f} MiB, {cache.meta['windows']:,} windows of {key['seq_len']})"
    )
    return cache


@torch.no_grad()
def build(
    dest: Path,
    teacher: torch.nn.Module,
    data: TokenData,
    export: Export,
    key: dict[str, Any],
    device: torch.device,
) -> None:
    """Write the cache into a temporary folder, then rename it into place (meta.json last)."""
    seq_len, top_k, temperature = key["seq_len"], key["top_k"], key["temperature"]
    n_windows = len(data.train) // seq_len - 1
    id_dtype = torch.int16 if export.vocab.n_classes <= torch.iinfo(torch.int16).max else torch.int32
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for shard, first in enumerate(range(0, n_windows, WINDOWS_PER_SHARD)):
        starts = np.arange(first, min(first + WINDOWS_PER_SHARD, n_windows)) * seq_len
        parts = [
            _teacher_topk(
                teacher,
                windows(data.train, starts[i : i + BUILD_BATCH], seq_len, export.vocab)[0],
                top_k,
                temperature,
                device,
            )
            for i in range(0, len(starts), BUILD_BATCH)
        ]
        ids, logp, tail = (torch.cat([p[j] for p in parts]) for j in range(3))
        tensors = {"ids": ids.to(id_dtype), "logp": logp.half(), "tail": tail.float()}
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"shard_{shard:05d}.safetensors")
        )
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    write_json(
        tmp / META,
        key | {"windows": n_windows, "bytes": size, "teacher": str(export.path), "data": str(data.dir)},
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)  # only an empty folder or our own unfinished one gets here
    os.replace(tmp, dest)


def _teacher_topk(
    teacher: torch.nn.Module, x: Tensor, top_k: int, temperature: float, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k classes, their log-probs at `temperature` and the tail log-mass: (B, T, k), (B, T, k), (B, T)."""
    hidden, _ = teacher.hidden_states(x.to(device))  # fp32: the cache does not depend on the run's precision
    B, T, C = hidden.shape
    ids, logp, tail = [], [], []
    weight = teacher.head_weight
    for _, logits in chunked_logits(hidden.reshape(-1, C), weight, chunk_rows(weight.shape[0])):
        top_ids, buckets = teacher_topk((logits / temperature).log_softmax(-1), top_k)
        ids.append(top_ids.cpu())
        logp.append(buckets[:, :-1].cpu())
        tail.append(buckets[:, -1].cpu())
    return torch.cat(ids).view(B, T, -1), torch.cat(logp).view(B, T, -1), torch.cat(tail).view(B, T)
