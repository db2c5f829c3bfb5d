"""Hugging Face interop: an export as a transformers GPT-2 folder, and a GPT-2 folder as initial weights.

**Export** (`export_gpt2`, recipes/export.py). GPT-2 is a pre-LN transformer with learned absolute
positions, biases everywhere, LayerNorm eps 1e-5, fused q/k/v split in that order, scores scaled by
1/sqrt(head_dim), a causal mask, the residual added after each sublayer, a final LayerNorm and a
bias-free LM head (tied to wte unless `tie_word_embeddings` is false). Our transformer blocks compute
the same function, so their weights map one to one; GPT-2's Conv1D stores (in, out), the transpose
of nn.Linear's (out, in). What our model has less of maps exactly onto GPT-2 weights that compute
nothing: no biases (--model.bias False) -> zero biases; no attention or no FFN sublayer -> a zero
output projection (its residual adds 0); sinusoidal positions -> wpe holds the same table; no
positions -> a zero wpe (both for positions below max_seq_len, GPT-2's n_positions). The activation
is recorded as it is: our GELU is exact (F.gelu), so "gelu", never GPT-2's tanh "gelu_new".

Refused (`gpt2_refusals`), each naming what to train instead: RoPE and ALiBi (GPT-2 only adds
position vectors), blocks without residuals or LayerNorms (the attention_only style), non-causal
attention, and compacted vocabularies. A compacted model has K kept ids plus `other`; over the full
vocabulary an unseen id's logit is `other`'s minus log(V - K). GPT-2's LM head is a bias-free linear
map of ln_f's output, so a per-id constant can only come from ln_f's bias along the direction
1/gamma (the one direction normalised activations have no component in): impossible with
--model.bias False, and otherwise amplified rounding by 1/sum(beta/gamma), not exact. So it is
refused: retrain with --data.compact-vocab off.

**Import** (`init_from_gpt2`, --init-from / --student.init-from): a transformers GPT-2 folder's weights
(safetensors, one file or sharded) loaded into our GPT, all of them (every shape must match the
model config, GPT-2 weights our model has no place for must be the neutral ones above) or the
embeddings only (token rows, and learned position rows). The vocabulary must be the data's: a
compacted vocabulary takes the kept ids' rows, and `other` the mean of the unseen ids' rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.files import remove_tree, write_json, write_text, writing
from pipeline.model.gpt import GPT
from pipeline.run.checkpoint import Export

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
RECORD = "gpt_distill.json"  # what the folder was made from: tokenizer, vocabulary, the export's record
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our GPT uses
InitParts = Literal["all", "embeddings"]
# Causal-mask buffers older GPT-2 checkpoints carry: not weights.
_BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


# --------------------------------------------------------------------------------------------------
# What GPT-2 can express
# --------------------------------------------------------------------------------------------------


def gpt2_refusals(cfg: ModelConfig, vocab: VocabMap | None = None) -> list[str]:
    """What GPT-2 cannot express of this model, each with what to train instead; [] when it maps exactly."""
    out = []
    if cfg.positions in ("rope", "alibi"):
        out.append(
            f"positions={cfg.positions}: GPT-2 adds learned absolute position vectors and cannot "
            f"{'rotate queries and keys' if cfg.positions == 'rope' else 'bias scores by distance'}; "
            f"train with --model.positions learned"
        )
    if not cfg.use_residual or not cfg.use_layernorm:
        missing = " and ".join(
            n for n, on in (("residual", cfg.use_residual), ("LayerNorm", cfg.use_layernorm)) if not on
        )
        out.append(
            f"blocks without {missing} connections (block={cfg.block}): GPT-2's blocks are pre-LN residual "
            f"blocks with a final LayerNorm; train with --model.block transformer"
        )
    if not cfg.causal:
        out.append("causal=False: GPT-2 always masks later positions; train with --model.causal True")
    if vocab is not None and vocab.compact:
        out.append(
            f"a compacted vocabulary ({vocab.n_classes - 1:,} kept ids + other, of {vocab.full_size:,}): over "
            f"the full vocabulary each unseen id's logit is other's minus log(V-K) = {vocab.log_unseen:.3f}, a "
            f"per-id constant GPT-2's bias-free LM head cannot add exactly; retrain with --data.compact-vocab off"
        )
    return out


def _inner(cfg: ModelConfig) -> int:
    """GPT-2's n_inner: the FFN width, or 1 for a model without FFNs (its zero MLP computes nothing)."""
    return cfg.ffn_mult * cfg.d_model if cfg.use_ffn else 1


def gpt2_config(cfg: ModelConfig, eot: int | None, encoding: str) -> dict[str, Any]:
    """config.json of the GPT2LMHeadModel computing `cfg`'s function (transformers fills the rest)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": _inner(cfg),
        "activation_function": cfg.activation,  # exact F.gelu is transformers' "gelu"; "relu" is F.relu
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_head,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "dtype": "float32",
        "tiktoken_encoding": encoding,
    }


# --------------------------------------------------------------------------------------------------
# The key map
# --------------------------------------------------------------------------------------------------


def key_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our key, GPT-2 key, transposed) for every weight our model has (Conv1D stores Linear's transpose)."""
    pairs = [("tok_emb.weight", "transformer.wte.weight", False)]
    if cfg.positions == "learned":
        pairs.append(("pos_emb.weight", "transformer.wpe.weight", False))
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        subs = []
        if cfg.attention:
            subs += [
                ("ln1", "ln_1", False),
                ("attn.qkv", "attn.c_attn", True),
                ("attn.proj", "attn.c_proj", True),
            ]
        if cfg.use_ffn:
            subs += [("ln2", "ln_2", False), ("ffn.fc", "mlp.c_fc", True), ("ffn.proj", "mlp.c_proj", True)]
        for ours, theirs, linear in subs:
            for p in params:
                pairs.append(
                    (f"blocks.{i}.{ours}.{p}", f"transformer.h.{i}.{theirs}.{p}", linear and p == "weight")
                )
    pairs += [(f"ln_f.{p}", f"transformer.ln_f.{p}", False) for p in params]
    if not cfg.tie_head:
        pairs.append(("head.weight", "lm_head.weight", False))
    return pairs


def gpt2_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the GPT2LMHeadModel of `gpt2_config(cfg)`, with its shape."""
    d, inner, v = cfg.d_model, _inner(cfg), cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (v, d),
        "transformer.wpe.weight": (cfg.max_seq_len, d),
    }
    block = {
        "ln_1.weight": (d,), "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,), "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (inner, d), "mlp.c_proj.bias": (d,),
    }  # fmt: skip
    for i in range(cfg.n_layers):
        shapes |= {f"transformer.h.{i}.{k}": s for k, s in block.items()}
    shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    if not cfg.tie_head:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def neutral_weights(model: GPT) -> dict[str, Tensor]:
    """GPT-2 weights with no counterpart in `model`, set to what computes the same function.

    Biases zero, LayerNorm gains one, an absent sublayer's weights zero (its output, hence what the
    residual adds, is 0); wpe holds a sinusoidal model's fixed table and is zero for no positions.
    """
    cfg = model.cfg
    mapped = {theirs for _, theirs, _ in key_pairs(cfg)}
    out = {}
    for key, shape in gpt2_shapes(cfg).items():
        if key in mapped:
            continue
        gain = re.search(r"ln_\d\.weight$", key) is not None
        out[key] = torch.ones(shape) if gain else torch.zeros(shape)
    if cfg.positions == "sinusoidal":
        with torch.no_grad():
            out["transformer.wpe.weight"] = model.sinusoidal_positions(torch.arange(cfg.max_seq_len)).float()
    return out


def gpt2_state(model: GPT) -> dict[str, Tensor]:
    """The GPT2LMHeadModel state dict (fp32, CPU) computing `model`'s function."""
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {theirs: (ours[key].t() if linear else ours[key]) for key, theirs, linear in key_pairs(model.cfg)}
    out |= neutral_weights(model)
    return {k: v.contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def check_exportable(export: Export) -> None:
    refusals = gpt2_refusals(export.model_cfg, export.vocab)
    if refusals:
        raise UsageError(
            f"{export.path} cannot be written as a GPT-2 model that computes the same logits: "
            + "; ".join(refusals)
        )


def export_gpt2(export: Export, out: Path) -> dict[str, Any]:
    """Write `export` as a transformers GPT-2 folder at `out` (atomically); returns what gpt_distill.json records."""
    check_exportable(export)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise UsageError(f"{out} exists and is not a GPT-2 export of this project; choose another --out")
    cfg, tokenizer = export.model_cfg, export.tokenizer
    record = {
        "format": 1,
        "source": str(export.path),
        "encoding": tokenizer.name,
        "tokenizer": tokenizer.spec,
        "vocab": export.vocab.to_json(),
        "model": dataclasses.asdict(cfg),
        "export": export.info.to_json(),
        "notes": _export_notes(cfg),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with writing(out, f"the GPT-2 folder {out.name}/", cleanup=remove_tree(tmp)):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(gpt2_state(export.model), str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        encoding = tokenizer.name if tokenizer.spec["encoding"] != "tiktoken_file" else tokenizer.spec["path"]
        write_json(tmp / HF_CONFIG, gpt2_config(cfg, tokenizer.eot, encoding))
        write_json(tmp / RECORD, record)
        write_text(tmp / "README.md", folder_readme(record, out))
        if out.exists():
            shutil.rmtree(out)  # a previous GPT-2 export of ours (checked above)
        os.replace(tmp, out)
    return record


def _export_notes(cfg: ModelConfig) -> list[str]:
    notes = []
    if cfg.positions in ("sinusoidal", "none"):
        notes.append(
            f"positions={cfg.positions}: wpe holds {'the fixed sin/cos table' if cfg.positions == 'sinusoidal' else 'zeros'}"
            f" for positions 0..{cfg.max_seq_len - 1}; the original model also runs past them, GPT-2 does not"
        )
    if not cfg.bias:
        notes.append("bias=False: GPT-2's biases are all zero")
    for name, on in (("attention", cfg.attention), ("ffn", cfg.use_ffn)):
        if not on:
            notes.append(f"{name}=False: that sublayer's GPT-2 weights are zero, so it adds nothing")
    if cfg.mask_value is not None or cfg.score_dtype != "auto":
        notes.append(
            "mask_value/score_dtype are numerics of the attention, not weights: GPT-2 masks with the "
            "dtype's minimum and computes scores in the model's dtype (in fp32 the same probabilities)"
        )
    return notes


def _encode_snippet(tokenizer: dict[str, Any], encoding: str) -> str:
    """Python lines turning `prompt` into the model's input ids."""
    if tokenizer["encoding"] == "char":
        return f"chars = {tokenizer['chars']!r}\nids = [chars.index(c) for c in prompt]"
    if tokenizer["encoding"] == "tiktoken_file":
        return (
            f"# a local .tiktoken file, {tokenizer['path']}, with {tokenizer['pattern_from']}'s split pattern\n"
            f"# (load it as pipeline.data.tokenizer.Tokenizer.from_spec(gpt_distill.json's tokenizer) does)"
        )
    return f"ids = tiktoken.get_encoding({encoding!r}).encode_ordinary(prompt)"


def folder_readme(record: dict[str, Any], folder: Path) -> str:
    """README.md of a GPT-2 folder: what it is and how to load it."""
    model, encoding = record["model"], record["encoding"]
    activation = 'exact GELU (transformers\' "gelu", not GPT-2\'s tanh "gelu_new")'
    activation = activation if model["activation"] == "gelu" else 'ReLU ("relu")'
    same = " (OpenAI GPT-2's own: AutoTokenizer.from_pretrained('gpt2') encodes the same)"
    notes = "".join(f"- {n}\n" for n in record["notes"]) or "- none: every weight maps one to one\n"
    return f"""# GPT-2 export of {record["source"]}

A transformers `GPT2LMHeadModel` computing the same logits as the gpt-distill export it was written from, by `python recipes/export.py`.
Shape: {model["n_layers"]} layers, {model["n_heads"]} heads, d_model {model["d_model"]}, vocabulary {model["vocab_size"]:,}, context {model["max_seq_len"]}.
Activation: {activation}. LM head: {"tied to" if model["tie_head"] else "untied from"} the token embedding.

Tokenizer: `{encoding}`{same if encoding in ("gpt2", "r50k_base") else ""}, recorded as config.json's `tiktoken_encoding` (the full spec in gpt_distill.json).
No transformers tokenizer file is written: encode the text as below and pass the ids.

```python
import tiktoken
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
prompt = "ROMEO:"
{_encode_snippet(record["tokenizer"], encoding)}
logits = model(torch.tensor([ids])).logits  # (1, T, {model["vocab_size"]})
```

Notes:
{notes}
gpt_distill.json records the source export, its tokenizer, vocabulary map and training record.
"""


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def read_gpt2(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers GPT-2 folder's config.json and weights (keys as GPT2LMHeadModel names them)."""
    folder = Path(folder)
    if not (folder / HF_CONFIG).is_file():
        raise UsageError(f"{folder} is not a transformers model folder (no {HF_CONFIG}); pass a GPT-2 folder")
    try:
        config = json.loads((folder / HF_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(
            f"{folder / HF_CONFIG} is unreadable or not valid JSON ({err}); save the model again"
        ) from err
    if config.get("model_type") != "gpt2":
        raise UsageError(
            f"{folder / HF_CONFIG} describes a {config.get('model_type')!r} model; only GPT-2 folders "
            f"(model_type gpt2) map onto this project's GPT"
        )
    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_INDEX).is_file():
        files = sorted(
            {folder / f for f in json.loads((folder / HF_INDEX).read_text())["weight_map"].values()}
        )
    else:
        raise UsageError(
            f"{folder} has no {HF_WEIGHTS}; save it with save_pretrained(folder, safe_serialization=True)"
        )
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is no dict)
                if not _BUFFERS.fullmatch(key):
                    name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
                    state[name] = fh.get_tensor(key).float()
    return config, state


def vocab_rows(table: Tensor, vocab: VocabMap) -> Tensor:
    """A full-vocabulary (V, d) table's rows for our classes: kept ids, then `other` (the unseen rows' mean)."""
    if not vocab.compact:
        return table
    unseen = torch.as_tensor(vocab.unseen_ids())
    return torch.cat((table[torch.as_tensor(vocab.kept)], table[unseen].mean(0, keepdim=True)))


def _check_vocab(config: dict[str, Any], folder: Path, vocab: VocabMap, encoding: str) -> None:
    size = int(config.get("vocab_size", 0))
    recorded = config.get("tiktoken_encoding")
    recorded = None if recorded and os.sep in recorded else recorded  # a .tiktoken file's path: sizes only
    if size != vocab.full_size or (recorded and recorded != encoding):
        theirs = f"{size:,} ids" + (f", encoding {recorded}" if recorded else "")
        raise UsageError(
            f"{folder} has a vocabulary of {theirs}, the data's is {encoding} with {vocab.full_size:,} ids; "
            f"tokenize the data with the GPT-2 folder's tokenizer (OpenAI's GPT-2: --encoding gpt2)"
        )


def _config_mismatches(config: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """What of a GPT-2 config no weight shape reveals but changes the function."""
    out = []
    if int(config.get("n_head", 0)) != cfg.n_heads:
        out.append(f"n_head {config.get('n_head')} vs model.n_heads {cfg.n_heads}")
    if not config.get("scale_attn_weights", True) or config.get("scale_attn_by_inverse_layer_idx", False):
        out.append("its attention scores are not scaled by 1/sqrt(head_dim) alone")
    if config.get("add_cross_attention", False):
        out.append("it has cross-attention, which this GPT has not")
    return out


def _why_unplaced(key: str, cfg: ModelConfig, n_layer: int) -> str:
    layer = re.match(r"transformer\.h\.(\d+)\.", key)
    if layer and int(layer[1]) >= cfg.n_layers:
        return f"the GPT-2 folder has {n_layer} layers, model.n_layers is {cfg.n_layers}"
    if key.endswith(".bias") and not cfg.bias:
        return "model.bias is False: pass --model.bias True"
    if key == "transformer.wpe.weight":
        return f"model.positions is {cfg.positions}: pass --model.positions learned"
    if ".attn." in key or ".ln_1." in key:
        return "model.attention is False: pass --model.attention True"
    if ".mlp." in key or ".ln_2." in key:
        return "model.ffn is False: pass --model.ffn True"
    return "the model config has no such weight"


def _listing(keys: list[str]) -> str:
    return f"{len(keys)} weights ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"


def _head(state: Mapping[str, Tensor], config: dict[str, Any]) -> Tensor:
    """GPT-2's LM head: lm_head.weight when untied, else wte."""
    untied = not config.get("tie_word_embeddings", True) and "lm_head.weight" in state
    return state["lm_head.weight"] if untied else state["transformer.wte.weight"]


def _mapped(state: Mapping[str, Tensor], model: GPT, vocab: VocabMap) -> tuple[dict[str, Tensor], list[str]]:
    """Our weights from their GPT-2 counterparts, and what is missing or does not fit."""
    cfg, ours = model.cfg, model.state_dict()
    out, missing, problems = {}, [], []
    for key, theirs, linear in key_pairs(cfg):
        if theirs not in state:
            missing.append(theirs)
            continue
        value = state[theirs].t() if linear else state[theirs]
        value = vocab_rows(value, vocab) if key in ("tok_emb.weight", "head.weight") else value
        value = value[: cfg.max_seq_len] if key == "pos_emb.weight" else value
        if value.shape != ours[key].shape:
            problems.append(
                f"{theirs} {tuple(state[theirs].shape)} does not fit {key} {tuple(ours[key].shape)}"
            )
        out[key] = value
    if missing:
        problems.insert(0, f"the GPT-2 folder lacks {_listing(missing)} this model has")
    return out, problems


def _unplaced(state: Mapping[str, Tensor], model: GPT, n_layer: int) -> list[str]:
    """GPT-2 weights with no counterpart in `model` that are not the neutral ones (which compute nothing)."""
    cfg, neutral = model.cfg, neutral_weights(model)
    mapped = {theirs for _, theirs, _ in key_pairs(cfg)} | {"lm_head.weight"}
    reasons: dict[str, list[str]] = {}
    for key in sorted(set(state) - mapped):
        expected = neutral.get(key)
        fits = expected is not None and expected.shape == state[key].shape
        if key == "transformer.wpe.weight" and expected is not None and state[key].shape[0] > cfg.max_seq_len:
            fits, expected = True, torch.cat((expected, state[key][cfg.max_seq_len :]))
        if not fits or not torch.allclose(state[key], expected, atol=1e-6):
            reasons.setdefault(_why_unplaced(key, cfg, n_layer), []).append(key)
    return [f"{_listing(keys)} have no place in this model: {why}" for why, keys in reasons.items()]


def all_weights(
    config: dict[str, Any], state: Mapping[str, Tensor], model: GPT, vocab: VocabMap
) -> tuple[dict[str, Tensor], list[str]]:
    """Our state dict from every GPT-2 weight, and each mismatch (empty: it loads)."""
    cfg = model.cfg
    state = dict(state) | {"lm_head.weight": _head(state, config)}
    out, problems = _mapped(state, model, vocab)
    if cfg.tie_head and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        problems.append("its LM head is untied from wte, model.tie_head is True: pass --model.no-tie-head")
    n_layer = int(config.get("n_layer", 0))
    return out, _config_mismatches(config, cfg) + problems + _unplaced(state, model, n_layer)


def embedding_weights(
    state: Mapping[str, Tensor], model: GPT, vocab: VocabMap
) -> tuple[dict[str, Tensor], list[str]]:
    """The token rows (and learned position rows) only, and each mismatch."""
    cfg, out, problems = model.cfg, {}, []
    wte = vocab_rows(state["transformer.wte.weight"], vocab)
    if wte.shape[1] != cfg.d_model:
        problems.append(f"its n_embd {wte.shape[1]} differs from model.d_model {cfg.d_model}")
    out["tok_emb.weight"] = wte
    if cfg.positions == "learned":
        wpe = state.get("transformer.wpe.weight")
        if wpe is None or wpe.shape[0] < cfg.max_seq_len:
            rows = 0 if wpe is None else wpe.shape[0]
            problems.append(f"it has {rows} positions, model.max_seq_len is {cfg.max_seq_len}: lower it")
        else:
            out["pos_emb.weight"] = wpe[: cfg.max_seq_len]
    return out, problems


def init_from_gpt2(
    model: GPT,
    folder: str | Path,
    parts: InitParts,
    vocab: VocabMap,
    encoding: str,
    flag: str = "--init-from",
) -> dict[str, Any]:
    """Load a transformers GPT-2 folder's weights into `model` (in place); returns what init_from.json records.

    `flag` is the option that named the folder (--init-from, --student.init-from), for the messages.
    """
    folder = Path(folder)
    config, state = read_gpt2(folder)
    _check_vocab(config, folder, vocab, encoding)
    if parts == "all":
        refusals = gpt2_refusals(model.cfg)
        if refusals:
            raise UsageError(
                f"{flag} {folder} with all weights: this model is no GPT-2: {'; '.join(refusals)}; "
                f"or pass {flag.replace('from', 'parts')} embeddings"
            )
        weights, problems = all_weights(config, state, model, vocab)
    else:
        weights, problems = embedding_weights(state, model, vocab)
    if problems:
        raise UsageError(
            f"{flag} {folder}: cannot initialise {parts} weights: "
            + "; ".join(problems)
            + (
                f"; change the model config to match, or pass {flag.replace('from', 'parts')} embeddings"
                if parts == "all"
                else ""
            )
        )
    with torch.no_grad():
        params = model.state_dict()
        for key, value in weights.items():
            params[key].copy_(value)
    return _init_record(folder, parts, config, vocab, sorted(weights), model.cfg)


def _init_record(
    folder: Path, parts: str, config: dict[str, Any], vocab: VocabMap, loaded: list[str], cfg: ModelConfig
) -> dict[str, Any]:
    notes = []
    activation = config.get("activation_function", "gelu_new")
    if parts == "all" and activation != cfg.activation:
        notes.append(
            f"the GPT-2 folder's activation is {activation}, model.activation is {cfg.activation}: "
            f"the initialised model computes a slightly different function"
        )
    if parts == "all" and not cfg.tie_head and config.get("tie_word_embeddings", True):
        notes.append(
            "the GPT-2 folder's LM head is tied to wte; model.tie_head is False: the head starts as wte's copy"
        )
    if vocab.compact:
        notes.append(
            f"compacted vocabulary: kept ids' rows, `other` = mean of {len(vocab.unseen_ids()):,} unseen rows"
        )
    return {
        "from": str(folder.resolve()),
        "parts": parts,
        "loaded": loaded,
        "gpt2": {
            k: config.get(k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
        },
        "activation": activation,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def verify_gpt2(export: Export, folder: Path, tokens: int = 64, seed: int = 0) -> float:
    """Load `folder` with transformers and compare its logits with the export's on a random window (fp32).

    Returns the largest absolute difference; a UsageError when it exceeds 1e-4 of the logits' scale.
    """
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise UsageError(
            "--verify needs transformers: pip install 'transformers>=4.40', or drop --verify"
        ) from err
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()
    cfg = export.model_cfg
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.vocab_size, (2, min(tokens, cfg.max_seq_len)), generator=generator)
    model = export.model.float().eval()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    diff = float((ours - theirs).abs().max())
    scale = max(1.0, float(ours.abs().max()))
    if diff > 1e-4 * scale:
        raise UsageError(
            f"{folder}: transformers' logits differ from {export.path}'s by up to {diff:.3g} "
            f"(logits up to {scale:.3g}); the conversion is wrong for this model, please report it"
        )
    return diff
