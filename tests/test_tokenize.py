"""The tokenize stage: exact counts, round trips, sources, idempotency and bad input."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import need_tiktoken, run_recipe

from pipeline.config import TokenizeConfig
from pipeline.data import corpus
from pipeline.data import tokenize as shards
from pipeline.data.shards import TokenData
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import UsageError


def tokenize(tmp_path: Path, **kwargs) -> Path:
    kwargs.setdefault("out", str(tmp_path / "out"))
    return shards.tokenize(TokenizeConfig(**kwargs), log=lambda _: None, progress=False)


# -- exact counts on Tiny Shakespeare (../shared/README.md) ---------------------------------------


@pytest.mark.parametrize(
    ("encoding", "train", "val", "vocab"),
    [
        ("gpt2", 301_966, 36_059, 50_257),
        ("o200k_base", 266_643, 30_963, 200_019),
        ("char", 1_003_854, 111_540, 65),
    ],
)
def test_tiny_shakespeare_counts_and_round_trip(tmp_path, shakespeare, encoding, train, val, vocab):
    if encoding != "char":
        need_tiktoken(encoding)
    out = tokenize(tmp_path, input="tinyshakespeare", encoding=encoding)
    data = TokenData.open(out)
    meta = data.meta
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (train, val, vocab)
    assert meta["dtype"] == ("uint32" if vocab > 65536 else "uint16")
    assert meta["source"]["sha256"] == corpus.TINYSHAKESPEARE_SHA256
    text = shakespeare.read_text()
    tok = data.tokenizer
    assert tok.decode(data.train) + tok.decode(data.val) == text
    assert sum(meta["token_counts"]["counts"]) == train
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode())
    if encoding == "o200k_base":
        assert int(np.asarray(data.train).max()) > 65535  # uint16 would have corrupted these ids


def test_char_vocabulary_is_stored_in_meta(tmp_path, shakespeare):
    meta = TokenData.open(tokenize(tmp_path, input="tinyshakespeare", encoding="char")).meta
    chars = meta["tokenizer"]["chars"]
    assert len(chars) == 65 and chars == "".join(sorted(chars))
    assert Tokenizer.from_spec(meta["tokenizer"]).encode("ROMEO:") == [chars.index(c) for c in "ROMEO:"]


@pytest.mark.parametrize("encoding", ["gpt2", "cl100k_base", "o200k_base", "char"])
def test_pieces_tokenize_exactly_like_the_whole_text(monkeypatch, shakespeare, encoding, tmp_path):
    """Cutting the corpus into pieces (parallel, bounded memory) changes no token."""
    if encoding != "char":
        need_tiktoken(encoding)
    text = shakespeare.read_text()[:200_000]
    path = tmp_path / "part.txt"
    path.write_text(text)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 5_000)
    out = tokenize(tmp_path, input=str(path), encoding=encoding, num_proc=2)
    data = TokenData.open(out)
    tok = (
        Tokenizer.build(encoding, train_text=[text[: int(len(text) * 0.9)]])
        if encoding != "char"
        else data.tokenizer
    )
    n = int(len(text) * 0.9)
    assert np.array_equal(np.asarray(data.train), tok.encode_array(text[:n]))
    assert np.array_equal(np.asarray(data.val), tok.encode_array(text[n:]))


def test_safe_cut_finds_a_lone_newline_before_a_letter():
    text = "abc def\nGhi jkl\n\nmno pq"
    cut = corpus.safe_cut(text, 19)
    assert text[:cut] == "abc def\n"  # not after "\n\n": gpt2 would merge the two newlines


# -- sources ----------------------------------------------------------------------------------------


def test_download_checks_sha256_and_caches(tmp_path, monkeypatch, shakespeare):
    monkeypatch.delenv(corpus.ENV_TINYSHAKESPEARE, raising=False)
    monkeypatch.setenv(corpus.ENV_CACHE, str(tmp_path / "cache"))
    path = corpus.tinyshakespeare_file(url=shakespeare.resolve().as_uri())
    assert path == tmp_path / "cache" / "tinyshakespeare.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == corpus.TINYSHAKESPEARE_SHA256
    # The cached copy is used from now on, even with an unreachable URL.
    assert corpus.tinyshakespeare_file(url="http://127.0.0.1:9/none") == path


def test_download_refuses_wrong_content(tmp_path, monkeypatch):
    monkeypatch.delenv(corpus.ENV_TINYSHAKESPEARE, raising=False)
    monkeypatch.setenv(corpus.ENV_CACHE, str(tmp_path / "cache"))
    fake = tmp_path / "fake.txt"
    fake.write_text("not shakespeare")
    with pytest.raises(UsageError, match="sha256"):
        corpus.tinyshakespeare_file(url=fake.resolve().as_uri())
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()


def test_offline_download_failure_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(corpus.ENV_TINYSHAKESPEARE, raising=False)
    monkeypatch.setenv(corpus.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="TINYSHAKESPEARE_PATH"):
        corpus.tinyshakespeare_file(url="http://127.0.0.1:9/input.txt")


def test_folder_of_documents_split_by_document_with_eot(tmp_path):
    need_tiktoken("gpt2")
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = [f"Document number {i}.\nIt has a few words in it.\n" for i in range(20)]
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text)
    data = TokenData.open(tokenize(tmp_path, input=str(folder), encoding="gpt2"))
    eot = data.tokenizer.eot
    assert data.meta["split"]["rule"] == "documents"
    n_docs = int((np.asarray(data.train) == eot).sum() + (np.asarray(data.val) == eot).sum())
    assert n_docs == 20 and (np.asarray(data.val) == eot).sum() >= 1
    decoded = data.tokenizer.decode(data.train).split("<|endoftext|>")
    assert all(doc in texts for doc in decoded if doc)
    # a glob gives the same documents
    again = TokenData.open(
        tokenize(tmp_path, input=str(folder / "*.txt"), encoding="gpt2", out=str(tmp_path / "g"))
    )
    assert np.array_equal(np.asarray(again.train), np.asarray(data.train))


def test_hugging_face_dataset_with_its_own_splits(tmp_path):
    need_tiktoken("gpt2")
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("".join(json.dumps({"text": f"train story {i}"}) + "\n" for i in range(30)))
    val_file.write_text("".join(json.dumps({"text": f"val story {i}"}) + "\n" for i in range(5)))
    files = (f"train={train_file}", f"validation={val_file}")
    data = TokenData.open(
        tokenize(tmp_path, input="hf:json", encoding="gpt2", hf_val_split="validation", hf_data_files=files)
    )
    assert data.meta["split"] == {"rule": "dataset splits", "train": "train", "val": "validation"}
    assert data.tokenizer.decode(data.val).count("val story") == 5
    assert data.tokenizer.decode(data.train).count("train story") == 30
    with pytest.raises(UsageError, match="no column"):
        tokenize(
            tmp_path,
            input="hf:json",
            encoding="gpt2",
            hf_data_files=files,
            text_column="body",
            out=str(tmp_path / "x"),
        )


def test_hugging_face_dataset_split_by_seeded_documents(tmp_path):
    need_tiktoken("gpt2")
    file = tmp_path / "docs.jsonl"
    file.write_text("".join(json.dumps({"text": f"story {i}"}) + "\n" for i in range(200)))
    data = TokenData.open(tokenize(tmp_path, input="hf:json", encoding="gpt2", hf_data_files=(str(file),)))
    val_docs = data.tokenizer.decode(data.val).count("story")
    assert 5 <= val_docs <= 40  # about val_fraction of 200 documents
    assert val_docs + data.tokenizer.decode(data.train).count("story") == 200


def test_local_tiktoken_file_matches_the_named_encoding(tmp_path):
    need_tiktoken("r50k_base")
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    cached = Path(os.environ["TIKTOKEN_CACHE_DIR"]) / hashlib.sha1(url.encode()).hexdigest()
    if not cached.is_file():
        pytest.skip("r50k_base.tiktoken is not in the tiktoken cache")
    local = tmp_path / "r50k_base.tiktoken"
    local.write_bytes(cached.read_bytes())
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?\n" * 50
    named = Tokenizer.build("r50k_base")
    from_file = Tokenizer.build(str(local), pattern_from="r50k_base")
    assert from_file.encode(text) == named.encode(text)
    assert from_file.vocab_size == named.vocab_size
    restored = Tokenizer.from_spec(from_file.spec)
    assert restored.decode(restored.encode(text)) == text


# -- idempotency and refusals ---------------------------------------------------------------------


def test_the_same_content_under_another_name_is_the_same_tokenization(tmp_path, tiny_corpus):
    copy = tmp_path / "copy" / "tiny.txt"
    copy.parent.mkdir()
    copy.write_bytes(tiny_corpus.read_bytes())
    out = tokenize(tmp_path, input=str(tiny_corpus), encoding="char")
    messages: list[str] = []
    shards.tokenize(
        TokenizeConfig(input=str(copy), encoding="char", out=str(out)), log=messages.append, progress=False
    )
    assert "reusing" in messages[0]


def test_same_settings_reuse_other_settings_refuse_overwrite_replaces(tmp_path, tiny_corpus):
    out = tokenize(tmp_path, input=str(tiny_corpus), encoding="char")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages: list[str] = []
    shards.tokenize(
        TokenizeConfig(input=str(tiny_corpus), encoding="char", out=str(out)),
        log=messages.append,
        progress=False,
    )
    assert "reusing" in messages[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(UsageError, match="--overwrite"):
        tokenize(tmp_path, input=str(tiny_corpus), encoding="char", val_fraction=0.2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    tokenize(tmp_path, input=str(tiny_corpus), encoding="char", val_fraction=0.2, overwrite=True)
    assert TokenData.open(out).meta["settings"]["val_fraction"] == 0.2


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else {}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "empty"),
        ("latin1", "not UTF-8"),
        ("encoding", "valid: gpt2"),
        ("other", "holds another tokenization"),
    ],
)
def test_bad_input_fails_clearly_and_touches_nothing(tmp_path, tiny_corpus, case, message):
    out = tmp_path / "out"
    args = ["--input", str(tiny_corpus), "--encoding", "char", "--out", str(out)]
    if case == "missing":
        args[1] = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args[1] = str(tmp_path / "empty.txt")
    elif case == "latin1":
        (tmp_path / "latin1.txt").write_bytes("Roméo et Juliette".encode("latin-1"))
        args[1] = str(tmp_path / "latin1.txt")
    elif case == "encoding":
        args[3] = "o200k"
    elif case == "other":
        run_recipe(
            "tokenize",
            "--input",
            str(tiny_corpus),
            "--encoding",
            "char",
            "--out",
            str(out),
            "--val-fraction",
            "0.2",
        )
    before = _files(out)
    proc = run_recipe("tokenize", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr
    assert _files(out) == before


def test_loader_refuses_truncated_shard(tmp_path, tiny_corpus):
    out = tokenize(tmp_path, input=str(tiny_corpus), encoding="char")
    with (out / "train.bin").open("r+b") as fh:
        fh.truncate((out / "train.bin").stat().st_size - 2)
    with pytest.raises(UsageError, match="truncated"):
        TokenData.open(out)


def test_loader_refuses_folder_without_meta(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes(b"\0" * 8)
    with pytest.raises(UsageError, match=r"no meta\.json"):
        TokenData.open(tmp_path / "half")


def test_interrupted_write_leaves_no_accepted_output(tmp_path, tiny_corpus, monkeypatch):
    def explode(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_meta", explode)
    with pytest.raises(KeyboardInterrupt):
        tokenize(tmp_path, input=str(tiny_corpus), encoding="char")
    out = tmp_path / "out"
    assert not (out / "meta.json").exists() and not list(out.glob("*.bin")) and not list(out.glob(".*tmp*"))
    with pytest.raises(UsageError):
        TokenData.open(out)


def test_recipe_contract_and_default_folder(tmp_path, tiny_corpus):
    proc = run_recipe("tokenize", "--input", str(tiny_corpus), "--encoding", "char", cwd=tmp_path)
    out = tmp_path / "data" / "tiny-char"
    assert (out / "meta.json").is_file(), proc.stdout
    assert json.loads((out / "config.json").read_text())["encoding"] == "char"
    assert "git_sha" in json.loads((out / "env.json").read_text())
    assert "MB/s" in proc.stdout
    proc = run_recipe("tokenize", "--input", str(tiny_corpus), "--encoding", "char", cwd=tmp_path)
    assert "reusing" in proc.stdout


def test_a_default_folder_is_reused_only_for_the_text_it_was_made_from(tmp_path, monkeypatch):
    """data/<name>-<encoding> is named by the file name alone: a/input.txt and b/input.txt (or a file
    edited since) would share it. Before, the second run trained on the first text without a word."""
    monkeypatch.setenv(shards.DATA_ROOT_ENV, str(tmp_path / "data"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "input.txt", tmp_path / "b" / "input.txt"
    first.write_text("to be or not to be\n" * 300)
    second.write_text("that is the question\n" * 300)
    made = shards.prepare_default(
        TokenizeConfig(input=str(first), encoding="char"), log=lambda _: None, progress=False
    )
    assert made == tmp_path / "data" / "input-char"
    stamp = (made / shards.META).stat().st_mtime_ns
    again = shards.prepare_default(
        TokenizeConfig(input=str(first), encoding="char"), log=lambda _: None, progress=False
    )
    assert again == made and (made / shards.META).stat().st_mtime_ns == stamp  # reused, not remade

    with pytest.raises(
        UsageError, match=rf"holds a tokenization of another text \({first}, .* than {second}"
    ):
        shards.prepare_default(
            TokenizeConfig(input=str(second), encoding="char"), log=lambda _: None, progress=False
        )
    first.write_text("to be or not to be, edited\n" * 300)
    with pytest.raises(UsageError, match="an earlier version of it"):
        shards.prepare_default(
            TokenizeConfig(input=str(first), encoding="char"), log=lambda _: None, progress=False
        )
    assert (made / shards.META).stat().st_mtime_ns == stamp  # refused: nothing rewritten


def test_content_sha256_is_the_hash_the_tokenization_records(tmp_path, tiny_corpus):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "one.txt").write_text("first document\n" * 50)
    (docs / "two.txt").write_text("second document\n" * 50)
    for spec in (str(tiny_corpus), str(docs)):
        out = shards.tokenize(
            TokenizeConfig(input=spec, encoding="char", out=str(tmp_path / f"{Path(spec).name}-char")),
            log=lambda _: None,
            progress=False,
        )
        assert corpus.content_sha256(spec) == TokenData.open(out).meta["settings"]["source_sha256"]
    assert corpus.content_sha256("tinyshakespeare") == corpus.TINYSHAKESPEARE_SHA256
    assert corpus.content_sha256(str(tmp_path / "missing.txt")) is None  # nothing to compare: no refusal


def test_every_process_of_a_launch_refuses_another_texts_folder_at_once(tmp_path):
    """Two CPU processes (launch/cpu_ddp.yaml): the check runs on each, before the barrier where the
    others wait for rank 0's tokenization, so each refuses by itself instead of waiting there for a
    rank 0 that has gone (accelerate's launcher happens to end the others; not every launcher does)."""
    import socket
    import subprocess

    from conftest import ROOT, accelerate_launch

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "input.txt").write_text("to be or not to be\n" * 300)
    (tmp_path / "b" / "input.txt").write_text("that is the question\n" * 300)
    data = tmp_path / "data"
    shards.tokenize(
        TokenizeConfig(
            input=str(tmp_path / "a" / "input.txt"), encoding="char", out=str(data / "input-char")
        ),
        log=lambda _: None,
        progress=False,
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [*accelerate_launch("cpu_ddp.yaml"), "--main_process_port", str(port), str(ROOT / "recipes" / "pretrain.py"),
           "--preset", "tiny", "--data.corpus", str(tmp_path / "b" / "input.txt"), "--out", str(tmp_path / "run"),
           "--max-steps", "2", "--train.dist-timeout", "600", "--train.no-progress"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", shards.DATA_ROOT_ENV: str(data)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "holds a tokenization of another text" in proc.stderr
    # Both processes refuse on their own (a launcher that does not end the others, as srun across
    # nodes, would otherwise leave rank 1 waiting at the barrier for rank 0's tokenization).
    assert proc.stderr.count("holds a tokenization of another text") == 2, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
