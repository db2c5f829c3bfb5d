"""Hugging Face interop: our GPT as a transformers GPT-2 folder and back, logits equal to 1e-5 both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_recipe

from pipeline.config import ModelConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.data.vocab import VocabMap
from pipeline.errors import UsageError
from pipeline.model.gpt import GPT
from pipeline.run import checkpoint, huggingface
from pipeline.run.checkpoint import ExportInfo

transformers = pytest.importorskip("transformers")

V = 100
CHARS = "".join(chr(33 + i) for i in range(V))
TINY = dict(block="transformer", n_layers=2, n_heads=4, d_model=32, max_seq_len=16, vocab_size=V)


def randomised(model: GPT, seed: int = 0) -> GPT:
    """Random weights everywhere: biases and LayerNorm gains and shifts too (none at their init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            gain = name.endswith(".weight") and name.split(".")[-2].startswith("ln")
            p.copy_(1.0 + 0.1 * noise if gain else 0.2 * noise)
    return model.eval()


def make_export(tmp_path: Path, name: str = "export", vocab: VocabMap | None = None, **model) -> Path:
    cfg = ModelConfig(**(TINY | model))
    gpt = randomised(GPT(cfg))
    vocab = vocab or VocabMap.identity(V)
    info = ExportInfo("teacher", "tiny", "run").to_json()
    dest = tmp_path / name
    checkpoint.export_model(dest, gpt.state_dict(), cfg, Tokenizer.char(CHARS).spec, vocab, info)
    return dest


def window(n: int = 16, batch: int = 2, high: int = V) -> torch.Tensor:
    return torch.randint(high, (batch, n), generator=torch.Generator().manual_seed(1))


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "variant",
    [
        {},  # learned positions, GELU, biases, untied head
        {"tie_head": True, "bias": False, "activation": "relu"},
        {"positions": "sinusoidal", "ffn": False},
        {"positions": "none", "attention": False, "ffn": True, "dropout": 0.1},
    ],
    ids=["learned-gelu-untied", "tied-nobias-relu", "sinusoidal-no-ffn", "no-positions-ffn-only"],
)
def test_export_computes_the_same_logits_in_transformers(tmp_path, variant):
    export = checkpoint.load_export(make_export(tmp_path, **variant))
    out = tmp_path / "hf"
    huggingface.export_gpt2(export, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == variant.get(
        "activation", "gelu"
    )
    assert config["tie_word_embeddings"] is variant.get("tie_head", False)
    ids = window()
    with torch.no_grad():
        ours = export.model(ids)
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=1e-5, rtol=0)
    # Loaded strictly: every weight of the GPT-2 model came from the file.
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_gpt2_folder_initialises_our_gpt_with_the_same_logits(tmp_path):
    hf_cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=4, activation_function="gelu"
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():  # every weight random, biases and LayerNorms included
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    hf.eval().save_pretrained(str(tmp_path / "gpt2"))
    model = GPT(ModelConfig(**(TINY | {"tie_head": True})))
    record = huggingface.init_from_gpt2(model, tmp_path / "gpt2", "all", VocabMap.identity(V), "char")
    assert len(record["loaded"]) == len(model.state_dict()) and record["parts"] == "all"
    ids = window()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_export_recipe_end_to_end(tmp_path):
    src = make_export(tmp_path)
    out = tmp_path / "hf"
    proc = run_recipe("export", "--model", str(src), "--out", str(out))
    assert f"wrote {out}" in proc.stdout and "from_pretrained" in proc.stdout
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "README.md",
        "gpt_distill.json",
    }
    record = json.loads((out / "gpt_distill.json").read_text())
    assert record["encoding"] == "char" and record["tokenizer"]["chars"] == CHARS
    assert json.loads((out / "config.json").read_text())["tiktoken_encoding"] == "char"
    assert "AutoModelForCausalLM.from_pretrained" in (out / "README.md").read_text()
    ids = window()
    with torch.no_grad():
        ours = checkpoint.load_export(src).model(ids)
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=1e-5, rtol=0)

    rope = make_export(tmp_path, "rope", positions="rope")
    proc = run_recipe("export", "--model", str(rope), "--out", str(tmp_path / "hf-rope"), check=False)
    assert (
        proc.returncode == 2
        and "positions=rope" in proc.stderr
        and "--model.positions learned" in proc.stderr
    )
    assert not (tmp_path / "hf-rope").exists()


@pytest.mark.parametrize(
    ("model", "expect"),
    [
        ({"positions": "rope"}, "--model.positions learned"),
        ({"positions": "alibi"}, "bias scores by distance"),
        ({"block": "attention_only"}, "--model.block transformer"),
        ({"causal": False}, "--model.causal True"),
    ],
)
def test_what_gpt2_cannot_express_is_refused(tmp_path, model, expect):
    export = checkpoint.load_export(make_export(tmp_path, **model))
    with pytest.raises(UsageError, match="cannot be written as a GPT-2") as err:
        huggingface.export_gpt2(export, tmp_path / "hf")
    assert expect in str(err.value) and not (tmp_path / "hf").exists()


def test_a_compacted_vocabulary_is_refused_naming_the_offset(tmp_path):
    kept = np.arange(0, V, 2)  # 50 ids kept + other: 51 classes
    vocab = VocabMap(V, kept)
    export = checkpoint.load_export(make_export(tmp_path, vocab=vocab, vocab_size=vocab.n_classes))
    with pytest.raises(UsageError, match="compacted vocabulary") as err:
        huggingface.export_gpt2(export, tmp_path / "hf")
    assert f"{np.log(V - len(kept)):.3f}" in str(err.value) and "--data.compact-vocab off" in str(err.value)


def test_an_unrelated_out_folder_is_not_overwritten_and_an_earlier_export_is(tmp_path):
    export = checkpoint.load_export(make_export(tmp_path))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a GPT-2 export"):
        huggingface.export_gpt2(export, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    huggingface.export_gpt2(export, tmp_path / "hf")
    huggingface.export_gpt2(export, tmp_path / "hf")  # replaced in place
    assert not list(tmp_path.glob(".hf.*"))


def gpt2_folder(tmp_path: Path, **kw) -> Path:
    cfg = transformers.GPT2Config(
        **({"vocab_size": V, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4} | kw)
    )
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    hf.save_pretrained(str(tmp_path / "gpt2"))
    return tmp_path / "gpt2"


def test_init_embeddings_takes_the_kept_rows_and_leaves_the_rest(tmp_path):
    folder = gpt2_folder(tmp_path)
    kept = np.arange(10, 60)
    vocab = VocabMap(V, kept)
    # Another shape (1 layer, 16 positions of GPT-2's 32): only the embeddings are taken.
    model = GPT(ModelConfig(**(TINY | {"n_layers": 1, "vocab_size": vocab.n_classes})))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = huggingface.init_from_gpt2(model, folder, "embeddings", vocab, "char")
    assert record["loaded"] == ["pos_emb.weight", "tok_emb.weight"]
    wte = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).transformer.wte.weight.detach()
    unseen = np.setdiff1d(np.arange(V), kept)
    torch.testing.assert_close(model.tok_emb.weight[:-1], wte[kept])
    torch.testing.assert_close(model.tok_emb.weight[-1], wte[unseen].mean(0))
    for key, value in model.state_dict().items():
        if key not in record["loaded"]:
            assert torch.equal(value, before[key]), key
    assert model.pos_emb.weight.shape[0] == 16  # the first max_seq_len of GPT-2's 32 positions


def test_init_all_lists_every_mismatch(tmp_path):
    folder = gpt2_folder(tmp_path, n_layer=3, n_head=2)
    model = GPT(ModelConfig(**(TINY | {"bias": False})))
    with pytest.raises(UsageError) as err:
        huggingface.init_from_gpt2(model, folder, "all", VocabMap.identity(V), "char")
    text = str(err.value)
    assert "n_head 2 vs model.n_heads 4" in text
    assert "have no place in this model: the GPT-2 folder has 3 layers, model.n_layers is 2" in text
    assert "--model.bias True" in text and "--init-parts embeddings" in text
    with pytest.raises(UsageError, match=r"a vocabulary of 100 ids, the data's is gpt2 with 50,257"):
        huggingface.init_from_gpt2(model, folder, "embeddings", VocabMap.identity(50257), "gpt2")


def test_pretrain_init_from_records_what_it_loaded(tmp_path, char_data):
    meta = json.loads((char_data / "meta.json").read_text())
    folder = gpt2_folder(tmp_path, vocab_size=meta["vocab_size"], n_head=2)
    out = tmp_path / "run"
    run_recipe(
        "pretrain", "--preset", "tiny", "--data", str(char_data), "--out", str(out), "--max-steps", "1",
        "--train.precision", "no", "--train.no-progress", "--init-from", str(folder), "--init-parts", "embeddings",
        "--train.eval-interval", "1", "--train.sample-tokens", "0", "--train.projector-tokens", "0",
    )  # fmt: skip
    record = json.loads((out / "init_from.json").read_text())
    assert record["parts"] == "embeddings" and record["loaded"] == ["pos_emb.weight", "tok_emb.weight"]
    assert record["from"] == str(folder.resolve())


def test_a_hub_layout_folder_reads_as_gpt2lmheadmodel_keys(tmp_path):
    """OpenAI's gpt2 on the Hub: GPT2Model keys (no `transformer.` prefix) and causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    folder = gpt2_folder(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in state.items()} | {
        "h.0.attn.bias": torch.ones(1, 1, 4, 4)
    }
    save_file(hub, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _, read = huggingface.read_gpt2(folder)
    assert set(read) == set(state) and "transformer.h.0.attn.c_attn.bias" in read
    model = GPT(ModelConfig(**(TINY | {"max_seq_len": 32, "tie_head": True})))
    huggingface.init_from_gpt2(model, folder, "all", VocabMap.identity(V), "char")
    torch.testing.assert_close(
        model.blocks[0].attn.qkv.weight, state["transformer.h.0.attn.c_attn.weight"].t()
    )
