"""Data pipeline behaviour a user notices: round trips, selection, errors, resumable sampling."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    EOS_TEXT,
    BatchSampler,
    BPETokenizer,
    ByteTokenizer,
    TokenData,
    batch_from_starts,
    load_tokenizer,
    prepare_corpus,
)
from trainer.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)

UNICODE_DOCS = {
    "a.txt": "Hello, world!\nSecond line with tabs\tand  spaces.\n",
    "b/c.txt": "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🚀🧪.",
    "b/d/e.txt": "Ελληνικά και русский текст\r\nwindows line ending\n\n",
}


def write_docs(root: Path, docs: dict[str, str]) -> None:
    for rel, text in docs.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))


def joined(docs: list[str]) -> str:
    return "".join(doc + EOS_TEXT for doc in docs)


def make_corpus_text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the model", "every expert", "the router", "my token"]
    verbs = ["sees", "routes", "trains", "likes", "chases", "computes"]
    objects = ["the mat", "a batch", "the gradient", "some text", "the loss", "a window"]
    lines = [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
        for _ in range(sentences)
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_eos() -> None:
    tok = ByteTokenizer()
    text = "naïve 🚀"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    assert tok.decode([*ids, tok.eos_id, *ids]) == text + EOS_TEXT + text
    # Ids past the vocabulary (a padded model embedding) must not crash decoding.
    assert tok.decode([104, 105, 999]) == "hi\ufffd"


def test_bpe_train_save_load(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(0, 300), encoding="utf-8")
    tok = BPETokenizer.train([corpus], vocab_size=320)
    assert tok.name == "bpe" and 257 <= tok.vocab_size <= 320
    text = "the router trains the gradient. ünïcödé 🚀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.encode("the cat sees the mat.")) < len(b"the cat sees the mat.")
    # A document containing the literal EOS string must not get a real EOS id.
    assert tok.eos_id not in tok.encode(f"before{EOS_TEXT}after")

    saved = tok.save(tmp_path)
    assert saved.name == "tokenizer.json"
    loaded = BPETokenizer.load(tmp_path)
    assert loaded.encode(text) == ids
    assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(DataError, match="257"):
        BPETokenizer.train(iter(["some text"]), vocab_size=200)


# ---------------------------------------------------------------- prepare + TokenData


def test_byte_round_trip_through_prepare(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, UNICODE_DOCS)
    out = tmp_path / "prepared"
    manifest = prepare_corpus([src], out, progress=False)

    data = TokenData.open(out, verify=True)
    expected_order = ["a.txt", "b/c.txt", "b/d/e.txt"]  # sorted by path
    assert ByteTokenizer().decode(data.tokens) == joined([UNICODE_DOCS[k] for k in expected_order])
    assert data.num_tokens == len(data.tokens) == manifest["num_tokens"]
    assert (data.vocab_size, data.eos_id, data.tokenizer_name) == (257, 256, "byte")
    assert data.tokens.dtype == np.dtype("<u2")
    assert int((np.asarray(data.tokens) == 256).sum()) == 3
    with pytest.raises((ValueError, RuntimeError)):
        data.tokens[0] = 1  # read-only map: training can never corrupt the corpus

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == data.manifest == manifest
    assert on_disk["num_documents"] == 3
    assert on_disk["source_bytes"] == sum(len(t.encode()) for t in UNICODE_DOCS.values())
    assert on_disk["inputs"] == [str(src.resolve())]
    assert len(on_disk["sha256"]) == 64 and on_disk["version"] == 1
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    assert not (out / "tokens.bin.tmp").exists() and not (out / "manifest.json.tmp").exists()


def test_invalid_utf8_replaced_and_empty_files_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.txt").write_bytes(b"ok \xff\xfe end")
    (src / "empty.txt").write_bytes(b"")
    out = tmp_path / "out"
    manifest = prepare_corpus([src], out, progress=False)
    assert manifest["num_documents"] == 1
    text = ByteTokenizer().decode(TokenData.open(out).tokens)
    assert text == "ok \ufffd\ufffd end" + EOS_TEXT


def test_bpe_round_trip_through_prepare(tmp_path: Path) -> None:
    src = tmp_path / "src"
    docs = {f"doc{i}.txt": make_corpus_text(i, 80) for i in range(4)}
    docs["doc4.txt"] = f"a document that mentions {EOS_TEXT} literally, and Köln 🚀\n"
    write_docs(src, docs)
    out = tmp_path / "bpe"
    manifest = prepare_corpus([src], out, tokenizer="bpe", vocab_size=350, progress=False)

    assert (out / "tokenizer.json").is_file()
    assert manifest["tokenizer"] == "bpe" and manifest["vocab_size"] <= 350
    data = TokenData.open(out, verify=True)
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer)
    assert tok.decode(data.tokens) == joined([docs[k] for k in sorted(docs)])
    # Exactly one real end-of-document per file, and BPE actually compresses.
    assert int((np.asarray(data.tokens) == tok.eos_id).sum()) == len(docs)
    assert data.num_tokens < manifest["source_bytes"] / 2


def test_recursion_include_filter_and_hidden_dirs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(
        src,
        {
            "top.txt": "top",
            "notes.md": "markdown is excluded",
            "deep/er/still.txt": "deep",
            ".git/objects.txt": "hidden dirs are skipped",
            "deep/.hidden.txt": "hidden files are skipped",
        },
    )
    extra = tmp_path / "extra.md"
    extra.write_text("named explicitly", encoding="utf-8")
    out = tmp_path / "out"
    manifest = prepare_corpus([src, extra], out, include="*.txt", progress=False)
    assert manifest["num_documents"] == 3
    text = ByteTokenizer().decode(TokenData.open(out).tokens)
    # Sorted by full path: <tmp>/extra.md < <tmp>/src/deep/... < <tmp>/src/top.txt
    assert text == joined(["named explicitly", "deep", "top"])
    assert "markdown" not in text and "hidden" not in text


def test_selection_is_sorted_and_deduplicated(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, {"b.txt": "B", "a.txt": "A"})
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    prepare_corpus([src / "b.txt", src], out1, progress=False)
    prepare_corpus([src], out2, progress=False)
    assert (out1 / "tokens.bin").read_bytes() == (out2 / "tokens.bin").read_bytes()
    assert ByteTokenizer().decode(TokenData.open(out1).tokens) == joined(["A", "B"])


def test_max_bytes_takes_whole_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, {f"{i}.txt": "x" * 100 for i in range(5)})
    manifest = prepare_corpus([src], tmp_path / "out", max_bytes=150, progress=False)
    assert manifest["num_documents"] == 2
    assert manifest["source_bytes"] == 200
    assert manifest["num_tokens"] == 202


def test_reprepare_over_prior_dir_replaces_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, {"a.txt": "first version of the corpus"})
    out = tmp_path / "out"
    prepare_corpus([src], out, tokenizer="bpe", vocab_size=300, progress=False)
    write_docs(src, {"a.txt": "second"})
    prepare_corpus([src], out, progress=False)
    assert not (out / "tokenizer.json").exists()  # stale bpe vocabulary removed
    assert ByteTokenizer().decode(TokenData.open(out, verify=True).tokens) == joined(["second"])


def test_refuses_to_clobber_unrelated_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, {"a.txt": "text"})
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete", encoding="utf-8")
    with pytest.raises(DataError, match="refusing to overwrite") as err:
        prepare_corpus([src], out, progress=False)
    assert str(out) in str(err.value)
    assert (out / "thesis.tex").read_text(encoding="utf-8") == "do not delete"
    assert not (out / "tokens.bin").exists()


def test_refuses_foreign_manifest_and_file_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, {"a.txt": "text"})
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "someone else"}', encoding="utf-8")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_corpus([src], other, progress=False)
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="not a directory"):
        prepare_corpus([src], a_file, progress=False)


def test_prepare_argument_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_docs(src, {"a.txt": "text"})
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        prepare_corpus([missing], tmp_path / "o", progress=False)
    assert str(missing) in str(err.value)
    with pytest.raises(DataError, match="no files matched") as err:
        prepare_corpus([src], tmp_path / "o", include="*.json", progress=False)
    assert str(src) in str(err.value)
    with pytest.raises(DataError, match="unknown tokenizer"):
        prepare_corpus([src], tmp_path / "o", tokenizer="sentencepiece", progress=False)
    with pytest.raises(DataError, match="257"):
        prepare_corpus([src], tmp_path / "o", tokenizer="bpe", vocab_size=100, progress=False)
    (src / "a.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        prepare_corpus([src], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # failed validation leaves nothing behind


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    write_docs(src, {"a.txt": "some training text " * 20})
    out = tmp_path / "data"
    prepare_corpus([src], out, progress=False)
    return out


def test_open_missing_dir_says_how_to_prepare(tmp_path: Path) -> None:
    missing = tmp_path / "never"
    with pytest.raises(DataError, match="does not exist") as err:
        TokenData.open(missing)
    assert "megamoe data prepare" in str(err.value) and str(missing) in str(err.value)


def test_open_unfinished_or_corrupt_manifest(tmp_path: Path, prepared: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenData.open(empty)
    manifest = prepared / "manifest.json"
    good = manifest.read_text(encoding="utf-8")
    manifest.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        TokenData.open(prepared)
    fields = json.loads(good)
    del fields["num_tokens"]
    manifest.write_text(json.dumps(fields), encoding="utf-8")
    with pytest.raises(DataError, match="num_tokens"):
        TokenData.open(prepared)


def test_open_truncated_tokens(prepared: Path) -> None:
    tokens = prepared / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-6])
    with pytest.raises(DataError, match="truncated") as err:
        TokenData.open(prepared)
    assert str(tokens) in str(err.value)


def test_verify_detects_corruption(prepared: Path) -> None:
    tokens = prepared / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    raw[0] ^= 1
    tokens.write_bytes(bytes(raw))
    TokenData.open(prepared)  # same size: only the checksum can tell
    with pytest.raises(DataError, match="sha256"):
        TokenData.open(prepared, verify=True)


# ---------------------------------------------------------------- sampler


def draw(sampler: BatchSampler, n: int) -> list[list[int]]:
    return [sampler.next_starts().tolist() for _ in range(n)]


def test_sampler_deterministic_across_epochs() -> None:
    # 101 tokens, seq_len 10 -> 10 windows; batch 3 crosses each epoch boundary mid-batch.
    a = BatchSampler(num_tokens=101, seq_len=10, batch_size=3, seed=7)
    b = BatchSampler(num_tokens=101, seq_len=10, batch_size=3, seed=7)
    batches = draw(a, 12)
    assert batches == draw(b, 12)
    assert a.state_dict()["epoch"] == 3
    c = BatchSampler(num_tokens=101, seq_len=10, batch_size=3, seed=8)
    assert draw(c, 12) != batches
    assert a.next_starts().dtype == np.int64


def test_sampler_visits_every_window_once_per_epoch() -> None:
    sampler = BatchSampler(num_tokens=1000, seq_len=16, batch_size=7, seed=0)
    n = sampler.num_windows
    assert n == (1000 - 1) // 16
    flat = [s for batch in draw(sampler, (3 * n) // 7 + 1) for s in batch]
    expected = list(range(0, n * 16, 16))
    epochs = [flat[i * n : (i + 1) * n] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == expected
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert max(flat) + 16 + 1 <= 1000  # the last window's target stays in the corpus


def test_sampler_epoch_order_depends_only_on_seed_and_epoch() -> None:
    fresh = BatchSampler(num_tokens=501, seq_len=5, batch_size=4, seed=3)
    used = BatchSampler(num_tokens=501, seq_len=5, batch_size=9, seed=3)
    draw(used, 40)
    assert np.array_equal(fresh.epoch_order(2), used.epoch_order(2))


def test_sampler_resume_through_json() -> None:
    original = BatchSampler(num_tokens=257, seq_len=8, batch_size=5, seed=11)
    draw(original, 9)  # 32 windows: state lands mid-epoch after a boundary
    state = json.loads(json.dumps(original.state_dict()))
    assert set(state) == {"seed", "epoch", "position", "seq_len", "batch_size", "num_tokens"}
    resumed = BatchSampler(num_tokens=257, seq_len=8, batch_size=5, seed=11)
    resumed.load_state_dict(state)
    assert draw(resumed, 20) == draw(original, 20)


def test_sampler_resume_rejects_different_corpus_or_config() -> None:
    state = BatchSampler(num_tokens=257, seq_len=8, batch_size=5, seed=11).state_dict()
    other = BatchSampler(num_tokens=300, seq_len=4, batch_size=5, seed=11)
    with pytest.raises(DataError, match="seq_len") as err:
        other.load_state_dict(state)
    assert "num_tokens" in str(err.value)
    with pytest.raises(DataError, match="seed"):
        BatchSampler(num_tokens=257, seq_len=8, batch_size=5, seed=12).load_state_dict(state)


def test_sampler_corpus_too_small_and_bad_args() -> None:
    with pytest.raises(DataError, match=r"corpus has 16 tokens; need at least seq_len\+1 = 17"):
        BatchSampler(num_tokens=16, seq_len=16, batch_size=1, seed=0)
    BatchSampler(num_tokens=17, seq_len=16, batch_size=1, seed=0)  # exactly enough: one window
    with pytest.raises(ConfigError, match="batch_size"):
        BatchSampler(num_tokens=100, seq_len=4, batch_size=0, seed=0)


def test_batch_from_starts_shifts_targets(prepared: Path) -> None:
    data = TokenData.open(prepared)
    sampler = BatchSampler(data.num_tokens, seq_len=12, batch_size=4, seed=0)
    starts = sampler.next_starts()
    inputs, targets = batch_from_starts(data.tokens, starts, 12)
    assert inputs.shape == targets.shape == (4, 12)
    assert inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row, start in enumerate(starts.tolist()):
        window = np.asarray(data.tokens[start : start + 13], dtype=np.int64)
        assert inputs[row].tolist() == window[:-1].tolist()
        assert targets[row].tolist() == window[1:].tolist()
    with pytest.raises(DataError, match="past the corpus"):
        batch_from_starts(data.tokens, [data.num_tokens - 5], 12)
