"""Configuration: presets, config files, dotted overrides, and errors that name the fix."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT, run_recipe

from pipeline import cli
from pipeline.config import ModelConfig, PretrainConfig, TokenizeConfig, TrainConfig
from pipeline.errors import ConfigError
from teachers import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_teacher_preset_builds_and_parses(name):
    cfg = cli.parse(PretrainConfig, PRESETS, ["--preset", name])
    assert cfg.preset == name
    assert dataclasses.asdict(cfg)["model"] == dataclasses.asdict(PRESETS[name]().model)


def test_precedence_preset_then_file_then_flags(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('[model]\nn_layers = 3\npositions = "alibi"\ntie_head = true\n[optim]\nlr = 0.02\n')
    cfg = cli.parse(
        PretrainConfig, PRESETS, ["--preset", "char", "--config", str(file), "--optim.lr", "0.05"]
    )
    assert cfg.model.n_layers == 3 and cfg.model.positions == "alibi" and cfg.model.tie_head
    assert cfg.optim.lr == 0.05  # the flag wins over the file
    assert cfg.model.d_model == 128 and cfg.train.micro_batch_size == 12  # the rest comes from the preset


def test_yaml_config_and_contract_spellings(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  activation_checkpointing: true\n  micro_batch_size: 3\n")
    cfg = cli.parse(
        PretrainConfig, PRESETS, ["--config", str(file), "--data", "d", "--out", "o", "--max-steps", "7"]
    )
    assert cfg.train.activation_checkpointing and cfg.train.micro_batch_size == 3
    assert (cfg.data.dir, cfg.out, cfg.train.max_steps) == ("d", "o", 7)


def test_unknown_file_key_suggests_the_closest(tmp_path, capsys):
    file = tmp_path / "c.toml"
    file.write_text("[model]\nn_layer = 3\n")
    with pytest.raises(SystemExit) as exc:
        cli.parse(PretrainConfig, PRESETS, ["--config", str(file)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.n_layer" in err and "did you mean 'n_layers'" in err and str(file) in err


def test_unknown_preset_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        cli.parse(PretrainConfig, PRESETS, ["--preset", "shakespear"])
    err = capsys.readouterr().err
    assert "did you mean 'shakespeare'" in err and "seed" in err


def test_unknown_flag_suggests_the_closest():
    proc = run_recipe("pretrain", "--train.max-step", "3", check=False, cwd=ROOT)
    assert proc.returncode == 2
    assert "--train.max-steps" in proc.stdout + proc.stderr


def test_invalid_values_name_the_field_and_fix():
    with pytest.raises(ConfigError, match=r"d_model=250 is not divisible by model.n_heads=4"):
        ModelConfig(d_model=250, n_heads=4)
    with pytest.raises(ConfigError, match="--max-steps"):
        TrainConfig(max_steps=0, max_epochs=0, max_tokens=0)
    with pytest.raises(ConfigError, match=r"data\.seq_len=512 exceeds model\.max_seq_len=256"):
        PretrainConfig(data=dataclasses.replace(PretrainConfig().data, seq_len=512))
    with pytest.raises(ConfigError, match="val_fraction"):
        TokenizeConfig(val_fraction=1.5)


def test_invalid_flag_value_exits_2_before_any_work(tmp_path):
    proc = run_recipe(
        "pretrain", "--model.d-model", "250", "--out", str(tmp_path / "r"), check=False, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "not divisible by model.n_heads" in proc.stdout + proc.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "data").exists()


def test_help_shows_field_docs():
    proc = run_recipe("pretrain", "--help", cwd=ROOT)
    assert "--model.n-heads" in proc.stdout and "Attention heads per block" in proc.stdout
