"""Tokenizers: text <-> token ids, with one end-of-document id.

Two choices, both byte-level so any text (including text that was not valid
UTF-8 and was decoded with replacement characters) round-trips exactly:

* :class:`ByteTokenizer` - ids 0..255 are UTF-8 bytes and 256 is end-of-document.
  Nothing to train or ship, ideal for tests and tiny models; the price is ~3-4x
  more tokens per text than a trained vocabulary.
* :class:`BPETokenizer` - a byte-level BPE trained with the ``tokenizers``
  library and saved as a standard ``tokenizer.json``. Shorter sequences, but the
  vocabulary must be trained on the corpus and travel with the prepared data.

The end-of-document token is rendered as :data:`EOS_TEXT` by ``decode`` for both,
so decoded output looks the same whichever tokenizer made it. Text that merely
contains the string ``<|endoftext|>`` is encoded as ordinary text: only the
prepare step inserts the real end-of-document id, so a document cannot forge a
boundary.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from trainer.data.dataset import TOKENIZER_NAME, read_manifest
from trainer.errors import DataError

EOS_TEXT = "<|endoftext|>"
TOKENIZER_NAMES = ("byte", "bpe")
# 256 byte symbols plus the end-of-document token: the smallest byte-level BPE.
MIN_BPE_VOCAB = 257

# BPE encodes long text as line-aligned pieces of about this many characters so
# encode_batch can spread the work across threads and no single encoding holds a
# whole file. A cut may tokenize the text next to it slightly differently than an
# uncut encode would, but never changes what the ids decode to.
_BPE_PIECE_CHARS = 64 << 10


class Tokenizer(ABC):
    """What the trainer needs from a tokenizer; decode is shared, encode is per-kind."""

    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no end-of-document added) as a uint32 array."""

    @abstractmethod
    def _decode_run(self, ids: np.ndarray) -> str:
        """Decode ids that are all in range and contain no end-of-document id."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no end-of-document id is appended."""
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int] | np.ndarray | Any) -> str:
        """Text of ``ids``; end-of-document renders as EOS_TEXT, out-of-range ids as U+FFFD.

        Out-of-range ids are tolerated rather than rejected because a model's
        embedding is often padded past the tokenizer's vocabulary, and sampling
        from an untrained model must still print something.
        """
        arr = np.asarray(ids if not isinstance(ids, Iterator) else list(ids), dtype=np.int64)
        arr = arr.ravel()
        breaks = np.flatnonzero((arr == self.eos_id) | (arr < 0) | (arr >= self.vocab_size))
        parts: list[str] = []
        start = 0
        for i in breaks.tolist():
            if i > start:
                parts.append(self._decode_run(arr[start:i]))
            parts.append(EOS_TEXT if arr[i] == self.eos_id else "\ufffd")
            start = i + 1
        if start < arr.size:
            parts.append(self._decode_run(arr[start:]))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end-of-document as 256."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def _decode_run(self, ids: np.ndarray) -> str:
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A byte-level BPE from the ``tokenizers`` library with an end-of-document token."""

    name = "bpe"

    def __init__(self, backend: HFTokenizer) -> None:
        eos = backend.token_to_id(EOS_TEXT)
        if eos is None:
            raise DataError(f"BPE tokenizer has no {EOS_TEXT} token; it was not made by megamoe")
        # Not persisted in tokenizer.json, so set on every construction: documents
        # containing the literal EOS string must not be split into fake documents.
        backend.encode_special_tokens = True
        self._backend = backend
        self._eos_id = int(eos)
        self._vocab_size = int(backend.get_vocab_size())

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def backend(self) -> HFTokenizer:
        return self._backend

    @classmethod
    def train(
        cls,
        files_or_iterator: Sequence[str | os.PathLike[str]] | Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Train on a list/tuple of file paths, or on any other iterable of text.

        A list or tuple is read as file paths (invalid UTF-8 replaced); anything
        else (a generator, an iterator) is consumed as text. The result may hold
        fewer than ``vocab_size`` tokens when the corpus has too few merges.
        """
        if vocab_size < MIN_BPE_VOCAB:
            raise DataError(
                f"bpe vocab_size {vocab_size} is too small; it needs at least {MIN_BPE_VOCAB} "
                "(256 bytes + end-of-document)"
            )
        if isinstance(files_or_iterator, (list, tuple)):
            texts: Iterable[str] = _read_training_files(files_or_iterator)
        else:
            texts = files_or_iterator
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` (``path`` may be the file or its directory); return the file."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        self._backend.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load a ``tokenizer.json`` (``path`` may be the file or its directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        if not path.is_file():
            raise DataError(f"BPE tokenizer file {path} does not exist")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on malformed JSON
            raise DataError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        return cls(backend)

    def encode_array(self, text: str) -> np.ndarray:
        pieces = _line_pieces(text, _BPE_PIECE_CHARS)
        if not pieces:
            return np.empty(0, dtype=np.uint32)
        encodings = self._backend.encode_batch_fast(pieces, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.uint32) for e in encodings])

    def _decode_run(self, ids: np.ndarray) -> str:
        return self._backend.decode(ids.tolist(), skip_special_tokens=False)


def _read_training_files(paths: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"BPE training file {path} does not exist")
        yield path.read_bytes().decode("utf-8", errors="replace")


def _line_pieces(text: str, target: int) -> list[str]:
    """Split ``text`` into pieces of roughly ``target`` chars, cutting only after a newline."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > target:
        cut = text.rfind("\n", start, start + target) + 1
        if cut <= start:
            # No newline in range: look further rather than splitting mid-line.
            cut = text.find("\n", start + target) + 1
            if cut <= 0:
                break
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared directory was made with, as its manifest records."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    name = manifest["tokenizer"]
    if name == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif name == "bpe":
        tokenizer = BPETokenizer.load(data_dir / TOKENIZER_NAME)
    else:
        raise DataError(f"{data_dir}: manifest names unknown tokenizer {name!r}")
    if (tokenizer.vocab_size, tokenizer.eos_id) != (manifest["vocab_size"], manifest["eos_id"]):
        raise DataError(
            f"{data_dir}: tokenizer has vocab_size {tokenizer.vocab_size} / eos_id "
            f"{tokenizer.eos_id} but the manifest says {manifest['vocab_size']} / "
            f"{manifest['eos_id']}; re-prepare the directory"
        )
    return tokenizer
