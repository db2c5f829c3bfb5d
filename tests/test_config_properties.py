"""Config files, property-tested: a wrong-typed value is refused naming the key, a right one kept exactly.

For a few fields of each kind (int, float, bool, optional bool, string, choice), hypothesis writes
a TOML or JSON file setting one field. A value of the field's type (inside the field's valid range)
must come back from `cli.parse` exactly, as that type; any other value must exit with status 2 and
`error: config file FILE: 'section.key' must be ...`.
"""

from __future__ import annotations

import json
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline import cli
from pipeline.config import ModelConfig, PretrainConfig, TrainConfig
from teachers import PRESETS

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PRESET = PRESETS["shakespeare"]()
POSITIONS = typing.get_args(typing.get_type_hints(ModelConfig)["positions"])
PRECISIONS = typing.get_args(typing.get_type_hints(TrainConfig)["precision"])


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (is the value of the field's type?, valid values of that type)
FIELDS = {
    "model.n_layers": (_is_int, st.integers(1, 12)),
    "data.seq_len": (_is_int, st.integers(1, PRESET.model.max_seq_len)),
    "train.log_interval": (_is_int, st.integers(1, 10**6)),
    "model.dropout": (
        lambda v: _is_int(v) or isinstance(v, float),
        st.floats(0.0, 0.99) | st.just(0),
    ),
    "optim.weight_decay": (
        lambda v: _is_int(v) or isinstance(v, float),
        st.floats(0.0, 1e6) | st.integers(0, 100),
    ),
    "model.tie_head": (lambda v: isinstance(v, bool), st.booleans()),
    "model.residual": (lambda v: v is None or isinstance(v, bool), st.none() | st.booleans()),
    "train.sample_prompt": (lambda v: isinstance(v, str), st.text(max_size=12)),
    "model.positions": (lambda v: isinstance(v, str) and v in POSITIONS, st.sampled_from(POSITIONS)),
    "train.precision": (lambda v: isinstance(v, str) and v in PRECISIONS, st.sampled_from(PRECISIONS)),
}

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from(["learned", "bf16", "1", "true", "--optim.lr"])
)
ANY_VALUE = SCALARS | st.lists(SCALARS, max_size=3)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML wants DEL escaped
    return "[" + ", ".join(_toml(v) for v in value) + "]"


def _has_none(value) -> bool:
    return value is None or (isinstance(value, list) and any(_has_none(v) for v in value))


def _parse(key: str, value, as_json: bool, scratch: Path):
    section, name = key.split(".")
    if as_json or _has_none(value):  # TOML has no null
        path = scratch / "c.json"
        path.write_text(json.dumps({section: {name: value}}))
    else:
        path = scratch / "c.toml"
        path.write_text(f"[{section}]\n{name} = {_toml(value)}\n", encoding="utf-8")
    return cli.parse(PretrainConfig, PRESETS, ["--config", str(path)]), path


@st.composite
def settings_of_one_field(draw):
    key = draw(st.sampled_from(sorted(FIELDS)))
    right_type, valid = FIELDS[key]
    value = draw(valid if draw(st.booleans()) else ANY_VALUE.filter(lambda v: not right_type(v)))
    return key, value, right_type(value), draw(st.booleans())


@SETTINGS
@given(case=settings_of_one_field())
def test_a_file_value_is_kept_exactly_or_refused_naming_the_key(capsys, case):
    key, value, right_type, as_json = case
    section, name = key.split(".")
    event("right type" if right_type else "wrong type")
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as scratch:
        if right_type:
            cfg, _ = _parse(key, value, as_json, Path(scratch))
            got = getattr(getattr(cfg, section), name)
            expected_type = (
                float if isinstance(getattr(getattr(PRESET, section), name), float) else type(value)
            )
            assert got == value and type(got) is expected_type
            others = {f: getattr(cfg, f) for f in ("model", "optim", "train", "data") if f != section}
            assert others == {f: getattr(PRESET, f) for f in others}  # nothing else moved
        else:
            with pytest.raises(SystemExit) as exc:
                _parse(key, value, as_json, Path(scratch))
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert err.startswith("error: config file ") and f"'{key}" in err and "must be" in err, err
