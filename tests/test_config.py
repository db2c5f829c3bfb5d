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


TOKENIZE_PRESETS = {"shakespeare": TokenizeConfig}  # TokenizeConfig().preset


def _parse_file(tmp_path, text, *flags, name="c.toml", cls=PretrainConfig, presets=PRESETS):
    file = tmp_path / name
    file.write_text(text)
    return cli.parse(cls, presets, ["--config", str(file), *flags]), file


def test_file_values_that_look_like_flags_stay_data(tmp_path):
    cfg, _ = _parse_file(tmp_path, '[train]\nsample_prompt = "--optim.lr 9"\n')
    assert cfg.train.sample_prompt == "--optim.lr 9"
    assert cfg.optim.lr == PRESETS["shakespeare"]().optim.lr
    cfg, _ = _parse_file(
        tmp_path,
        'hf_data_files = ["--optim.lr", "9", "--overwrite"]\n',
        cls=TokenizeConfig,
        presets=TOKENIZE_PRESETS,
    )
    assert cfg.hf_data_files == ("--optim.lr", "9", "--overwrite") and not cfg.overwrite
    cfg, _ = _parse_file(tmp_path, '{"train": {"resume": "--max-steps"}}', name="c.json")
    assert (
        cfg.train.resume == "--max-steps" and cfg.train.max_steps == PRESETS["shakespeare"]().train.max_steps
    )


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[optim]\nlr = "fast"\n', "optim.lr", "a number"),
        ("[model]\nn_layers = 2.5\n", "model.n_layers", "an integer"),
        ('[model]\npositions = "spiral"\n', "model.positions", "one of 'learned', 'sinusoidal'"),
        ('[train]\nprecision = "fp8"\n', "train.precision", "'bf16'"),
        ("[model]\nresidual = 1\n", "model.residual", "true or false or null"),
        ("[train]\nprogress = 1\n", "train.progress", "must be true or false"),
        ("[train]\nsample_prompt = 3\n", "train.sample_prompt", "a string"),
        ('[data]\nseq_len = "--model.n-layers"\n', "data.seq_len", "an integer"),
    ],
)
def test_wrong_file_value_type_names_file_key_and_type(tmp_path, capsys, text, key, expected):
    with pytest.raises(SystemExit) as exc:
        _parse_file(tmp_path, text)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'c.toml'}: '{key}' must be" in err and expected in err


def test_wrong_list_item_type_names_the_item(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse_file(tmp_path, 'hf_data_files = ["a", 3]\n', cls=TokenizeConfig, presets=TOKENIZE_PRESETS)
    assert "'hf_data_files[1]' must be a string" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse_file(tmp_path, 'hf_data_files = "a"\n', cls=TokenizeConfig, presets=TOKENIZE_PRESETS)
    assert "'hf_data_files' must be a list" in capsys.readouterr().err


def test_file_values_are_typed_and_null_is_allowed_where_the_field_is_optional(tmp_path):
    cfg, _ = _parse_file(tmp_path, "optim:\n  lr: 1\nmodel:\n  residual: null\n  ffn: false\n", name="c.yaml")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.residual is None and cfg.model.ffn is False


def test_flags_override_the_file_and_the_rest_keeps_the_preset(tmp_path):
    preset = PRESETS["char"]()
    cfg, _ = _parse_file(
        tmp_path, "[optim]\nlr = 0.02\nwarmup_steps = 7\n", "--preset", "char", "--optim.lr", "0.05"
    )
    assert cfg.optim.lr == 0.05 and cfg.optim.warmup_steps == 7
    assert cfg.optim.min_lr == preset.optim.min_lr and cfg.model == preset.model
    assert cfg.train == preset.train and cfg.preset == "char"
    cfg, _ = _parse_file(tmp_path, "[optim]\nlr = 0.02\n", "--preset", "char")
    assert cfg.optim.lr == 0.02


def test_file_fields_are_checked_as_a_whole(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse_file(tmp_path, "[model]\nd_model = 250\n")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: config file {tmp_path / 'c.toml'}: model.d_model=250 is not divisible" in err
    with pytest.raises(SystemExit) as exc:
        _parse_file(tmp_path, "[data]\nseq_len = 512\n")
    assert exc.value.code == 2 and "exceeds model.max_seq_len" in capsys.readouterr().err
    # a flag may fix what the file alone leaves inconsistent: the final instance is what is checked
    cfg, _ = _parse_file(tmp_path, "[model]\nd_model = 250\n", "--model.n-heads", "5")
    assert (cfg.model.d_model, cfg.model.n_heads) == (250, 5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('preset = "char"\n', "'preset' belongs on the command line (--preset)"),
        ("model = 3\n", "'model' must be a table of settings"),
        ("[model.n_layers]\nx = 1\n", "'model.n_layers' is a single value, not a table"),
        ("[optim]\nlr = 0.1\n[optim.schedul]\n", "unknown key 'optim.schedul' (did you mean 'schedule'?)"),
    ],
)
def test_file_structure_errors_name_the_file(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exc:
        _parse_file(tmp_path, text)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'c.toml'}" in err and message in err


def test_unreadable_or_missing_file_or_bad_suffix(tmp_path, capsys):
    for name, text, message in [
        ("c.toml", "[x", "could not be read"),
        ("c.ini", "x = 1", "use a .toml, .yaml, .yml or .json file"),
    ]:
        with pytest.raises(SystemExit):
            _parse_file(tmp_path, text, name=name)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(PretrainConfig, PRESETS, ["--config", str(tmp_path / "none.toml")])
    assert "does not exist" in capsys.readouterr().err


def test_a_learning_rate_multiplier_of_a_part_the_model_lacks_is_refused():
    """--optim.lr-mult-head with a tied head (every shipped preset but tiny and seed) used to change
    nothing: the tied matrix learns at --optim.lr-mult-tok-emb."""
    from pipeline.config import OptimConfig, require_lr_mults_apply

    tied = ModelConfig(tie_head=True, positions="rope")
    with pytest.raises(ConfigError, match=r"lr_mult_head=2\.0 applies to no parameter: the head is tied"):
        require_lr_mults_apply(OptimConfig(lr_mult_head=2.0), tied)
    with pytest.raises(
        ConfigError, match=r"lr_mult_pos_emb=0\.5 applies to no parameter: positions are rope"
    ):
        require_lr_mults_apply(OptimConfig(lr_mult_pos_emb=0.5), tied)
    require_lr_mults_apply(OptimConfig(lr_mult_tok_emb=2.0), tied)  # the tied matrix's own multiplier
    require_lr_mults_apply(OptimConfig(lr_mult_head=2.0, lr_mult_pos_emb=0.5), ModelConfig(tie_head=False))
    with pytest.raises(SystemExit):  # the recipe's parse: exit 2 before any work
        cli.parse(PretrainConfig, PRESETS, ["--preset", "char", "--optim.lr-mult-head", "2"])
