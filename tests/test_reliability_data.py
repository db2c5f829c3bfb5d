"""The data-folder validator: a damaged meta.json or shard is refused naming the field, or reads the same.

Property tests generate variants of a good tokenization (a key dropped, a value of the wrong type,
a wrong dtype, a vocabulary smaller than an id in the shards, token counts out of range, a
truncated or corrupted shard). Each variant must be either refused with a UsageError that names
the meta.json field and the fix, or accepted with exactly the original shards, vocabulary and
tokenizer (a field nothing can cross-check, such as val_bytes, may take another valid value).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import need_tiktoken, synthetic_text
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.config import TokenizeConfig
from pipeline.data import tokenize
from pipeline.data.shards import TokenData
from pipeline.data.tokenizer import Tokenizer, check_encodable
from pipeline.errors import UsageError

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
VAL_ONLY = "~|`"  # characters only the val split has: a char vocabulary puts them last


def _tokenize(path: Path, text: str, encoding: str) -> Path:
    corpus = path / "corpus.txt"
    corpus.write_text(text)
    out = path / f"data-{encoding}"
    tokenize.tokenize(
        TokenizeConfig(input=str(corpus), encoding=encoding, out=str(out)), log=lambda _: None, progress=False
    )
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small char tokenization whose val split ends with characters the train split lacks."""
    return _tokenize(tmp_path_factory.mktemp("good"), synthetic_text(4000) + VAL_ONLY + "\n", "char")


@pytest.fixture(scope="module")
def original(good) -> TokenData:
    data = TokenData.open(good)
    top = len(data.meta["tokenizer"]["chars"])
    assert data.meta["token_counts"]["ids"][-1] < top - len(VAL_ONLY) <= int(data.val.max())
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_data(data: TokenData, original: TokenData) -> None:
    assert np.array_equal(data.train, original.train) and data.train.dtype == original.train.dtype
    assert np.array_equal(data.val, original.val) and data.val.dtype == original.val.dtype
    assert data.vocab_size == original.vocab_size
    assert data.tokenizer.spec == original.tokenizer.spec
    assert data.meta["token_counts"] == original.meta["token_counts"]
    assert data.meta["encoding"] == original.meta["encoding"]


def _check_variant(folder: Path, original: TokenData, field: str) -> None:
    """Accepted with the original data, or refused naming `field`, the meta.json and the fix."""
    try:
        data = TokenData.open(folder)
    except UsageError as err:
        event("refused")
        message = str(err)
        assert f"'{field.split('.')[0]}" in message, message  # the field, or one under the same key
        assert str(folder / "meta.json") in message or str(folder) in message, message
        if "cannot be built" not in message:  # an unknown encoding names its own fix
            assert "recipes/tokenize.py" in message and "--overwrite" in message, message
        return
    event("accepted")
    _same_data(data, original)


# -- meta.json variants ----------------------------------------------------------------------------

# The fields the pipeline reads (grep `meta[` in pipeline/ and recipes/), as paths into meta.json.
FIELDS = [
    ("tokenizer",),
    ("tokenizer", "encoding"),
    ("tokenizer", "chars"),
    ("encoding",),
    ("vocab_size",),
    ("dtype",),
    ("train_tokens",),
    ("val_tokens",),
    ("val_bytes",),
    ("token_counts",),
    ("token_counts", "ids"),
    ("token_counts", "counts"),
    ("source",),
    ("source", "sha256"),
]

ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
DTYPE_NAMES = st.sampled_from(
    ["float32", "float16", "int64", "int32", "uint8", "uint16", "uint32", "bogus", ""]
)
ENCODINGS = st.sampled_from(["char", "bogus_encoding", "tiktoken_file", "", "CHAR"])


def _mutation(path: tuple[str, ...]) -> st.SearchStrategy:
    """keep, drop, set (any JSON value, or one of the field's type that may be wrong) or nudge by a delta."""
    leaf = path[-1]
    same_type = {
        "dtype": DTYPE_NAMES,
        "encoding": ENCODINGS if path == ("tokenizer", "encoding") else st.sampled_from(["char", "gpt2", ""]),
        "chars": st.text(min_size=0, max_size=4) | st.just("aa"),
        "ids": st.lists(st.integers(-3, 200), max_size=6),
        "counts": st.lists(st.integers(-3, 10_000), max_size=6),
        "val_bytes": st.integers(-3, 10**9),  # any positive count is valid: nothing can cross-check it
        "sha256": st.none() | st.text(max_size=8),
    }.get(leaf, st.integers(-(2**64), 2**64) | st.integers(-3, 100_000))
    nudge = st.tuples(st.just("nudge"), st.integers(0, 10**6), st.integers(-3, 3).filter(bool))
    return st.sampled_from([("keep",), ("drop",)]) | st.tuples(st.just("set"), same_type | ANY_JSON) | nudge


def _apply(meta: dict, path: tuple[str, ...], mutation: tuple) -> dict:
    meta = copy.deepcopy(meta)
    table = meta
    for key in path[:-1]:
        table = table[key]
    if mutation[0] == "keep":
        pass
    elif mutation[0] == "nudge":  # plausible damage: an integer, or one item of a list, off by a little
        _, where, delta = mutation
        value = table[path[-1]]
        if _is_int(value):
            table[path[-1]] = value + delta
        elif isinstance(value, list) and value:
            value[where % len(value)] += delta
    elif mutation[0] == "drop":
        del table[path[-1]]
    else:
        table[path[-1]] = mutation[1]
    return meta


def _folder_with(good: Path, scratch: Path, meta_text: str) -> Path:
    folder = scratch / "d"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(good, folder)
    (folder / "meta.json").write_text(meta_text)
    return folder


@pytest.mark.parametrize("path", FIELDS, ids=".".join)
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_meta_variants_are_refused_naming_the_field_or_read_the_same(good, original, path, data):
    mutation = data.draw(_mutation(path), label="mutation")
    meta = _apply(json.loads((good / "meta.json").read_text()), path, mutation)
    with tempfile.TemporaryDirectory() as scratch:
        folder = _folder_with(good, Path(scratch), json.dumps(meta))
        _check_variant(folder, original, ".".join(path))


@SETTINGS
@given(keep=st.integers(1, 1_000))
def test_a_vocabulary_smaller_than_a_val_id_is_refused(good, original, keep):
    """chars, vocab_size and token_counts cut down consistently: only the shards show the damage."""
    meta = json.loads((good / "meta.json").read_text())
    chars = meta["tokenizer"]["chars"]
    keep = meta["token_counts"]["ids"][-1] + 1 + keep % (len(chars) - 1 - meta["token_counts"]["ids"][-1])
    meta["tokenizer"]["chars"], meta["vocab_size"] = chars[:keep], keep
    with tempfile.TemporaryDirectory() as scratch:
        folder = _folder_with(good, Path(scratch), json.dumps(meta))
        with pytest.raises(UsageError, match=r"field 'vocab_size' is .* val\.bin holds id"):
            TokenData.open(folder)


# -- shard variants --------------------------------------------------------------------------------


@st.composite
def shard_variants(draw):
    split = draw(st.sampled_from(["train", "val"]))
    kind = draw(st.sampled_from(["truncate", "append", "id"]))
    return split, kind, draw(st.integers(1, 5)), draw(st.integers(0, 2**31)), draw(st.integers(0, 2**16 - 1))


@SETTINGS
@given(variant=shard_variants())
def test_shard_variants_are_refused_naming_the_field(good, original, variant):
    split, kind, n_bytes, where, new_id = variant
    with tempfile.TemporaryDirectory() as scratch:
        folder = _folder_with(good, Path(scratch), (good / "meta.json").read_text())
        shard = folder / f"{split}.bin"
        raw = shard.read_bytes()
        if kind == "truncate":
            shard.write_bytes(raw[:-n_bytes])
            field = f"{split}_tokens"
        elif kind == "append":
            shard.write_bytes(raw + b"\0" * n_bytes)
            field = f"{split}_tokens"
        else:  # an id past the last counted train id (or past the vocabulary, for val)
            tokens = np.frombuffer(raw, dtype=original.train.dtype).copy()
            low = original.meta["token_counts"]["ids"][-1] + 1 if split == "train" else original.vocab_size
            tokens[where % len(tokens)] = low + new_id % (2**16 - low)
            shard.write_bytes(tokens.tobytes())
            field = "vocab_size" if tokens.max() >= original.vocab_size else "token_counts.ids"
        with pytest.raises(UsageError) as err:
            TokenData.open(folder)
        assert f"'{field}'" in str(err.value) and "--overwrite" in str(err.value)


# -- the rules one by one ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "float32"}, r"field 'dtype' must be one of uint16, uint32 \(integer token ids\)"),
        ({"dtype": 16}, r"field 'dtype' must be one of uint16, uint32, got 16"),
        ({"vocab_size": True}, r"field 'vocab_size' must be an integer >= 1, got True"),
        ({"vocab_size": 0}, r"field 'vocab_size' must be an integer >= 1, got 0"),
        ({"vocab_size": 3}, r"field 'vocab_size' is 3 but field 'tokenizer' \(char\) has \d+ ids"),
        ({"val_tokens": -1}, r"field 'val_tokens' must be an integer >= 0"),
        ({"val_bytes": 0}, r"field 'val_bytes' must be an integer >= 1"),
        ({"val_bytes": "12"}, r"field 'val_bytes' must be an integer >= 1, got '12'"),
        ({"encoding": "gpt2"}, r"field 'encoding' is 'gpt2' but field 'tokenizer' names 'char'"),
        ({"token_counts": {"ids": [1, 2]}}, r"field 'token_counts.counts' is missing"),
        ({"token_counts": {"ids": [2, 1], "counts": [1, 1]}}, r"'token_counts.ids' must be sorted, unique"),
        ({"token_counts": {"ids": [1], "counts": [1, 2]}}, r"'token_counts' has 1 ids but 2 counts"),
        (
            {"token_counts": {"ids": [1, 2], "counts": [1, 1]}},
            r"summing to field 'train_tokens' \([\d,]+\), got a sum of 2",
        ),
        ({"tokenizer": {"encoding": "char", "chars": "abca"}}, r"'tokenizer.chars' must be .* distinct"),
        (
            {"tokenizer": {"encoding": "o200k"}},
            r"field 'tokenizer' cannot be built: unknown encoding 'o200k'",
        ),
        ({"tokenizer": {"encoding": "tiktoken_file"}}, r"field 'tokenizer.path' is missing"),
        ({"source": {}}, r"field 'source.sha256' is missing"),
    ],
)
def test_each_rule_names_the_field_and_the_fix(good, tmp_path, change, message):
    meta = {**json.loads((good / "meta.json").read_text()), **change}
    folder = _folder_with(good, tmp_path, json.dumps(meta))
    with pytest.raises(UsageError, match=message) as err:
        TokenData.open(folder)
    assert str(folder / "meta.json") in str(err.value)


@pytest.mark.parametrize("text", ["[1, 2]", "{", ""])
def test_meta_that_is_not_a_json_object_is_refused(good, tmp_path, text):
    folder = _folder_with(good, tmp_path, text)
    with pytest.raises(UsageError, match=r"meta\.json (is unreadable|must hold a JSON object).*--overwrite"):
        TokenData.open(folder)


def test_a_large_vocabulary_needs_uint32(tmp_path):
    need_tiktoken("o200k_base")
    good = _tokenize(tmp_path, synthetic_text(3000), "o200k_base")
    data = TokenData.open(good)
    assert data.train.dtype == np.uint32 and data.vocab_size > 2**16
    meta = json.loads((good / "meta.json").read_text())
    folder = _folder_with(good, tmp_path / "x", json.dumps({**meta, "dtype": "uint16"}))
    with pytest.raises(
        UsageError, match=r"field 'dtype' is uint16, which cannot hold ids of a vocabulary of 200,0"
    ):
        TokenData.open(folder)


# -- encodability of a prompt --------------------------------------------------------------------


def test_check_encodable_names_the_flag_and_the_missing_characters():
    chars = Tokenizer.char(sorted("ROME: abc"))
    check_encodable(chars, "ROMEO: abba", "--train.sample-prompt")
    check_encodable(chars, "", "--train.sample-prompt")
    with pytest.raises(UsageError, match=r"--train\.sample-prompt='JULIET: z'.* lacks: 'IJLTUz'"):
        check_encodable(chars, "JULIET: z", "--train.sample-prompt")


def test_check_encodable_accepts_any_text_for_tiktoken():
    need_tiktoken("o200k_base")
    check_encodable(Tokenizer.build("o200k_base"), "JULIET: ☃ \x00 z", "--train.sample-prompt")


def test_an_unencodable_sample_prompt_fails_at_start_up(char_data, tmp_path):
    from conftest import run_recipe

    out = tmp_path / "run"
    proc = run_recipe(
        "pretrain", "--preset", "tiny", "--data", str(char_data), "--out", str(out), "--max-steps", "2",
        "--train.sample-prompt", "ZEBRA~", "--train.no-progress", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--train.sample-prompt" in proc.stderr and "lacks: 'Z~'" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_a_damaged_tokenization_is_not_reused(tiny_corpus, tmp_path):
    from pipeline.config import TokenizeConfig
    from pipeline.data import tokenize

    out = tmp_path / "data"

    def run(**kw):
        return tokenize.tokenize(
            TokenizeConfig(input=str(tiny_corpus), encoding="char", out=str(out), **kw),
            log=lambda _: None,
            progress=False,
        )

    run()
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta | {"dtype": "float32"}))
    with pytest.raises(UsageError, match=r"damaged: .*field 'dtype'"):
        run()  # the same settings: once reused whatever its state, now refused with the validator's reason
    run(overwrite=True)
    assert TokenData.open(out).meta["dtype"] == meta["dtype"]
