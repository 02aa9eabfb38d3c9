"""Turn a text corpus into a prepared token directory.

Every selected file is one document: it is encoded and followed by the
end-of-document id, and the ids are appended to ``tokens.bin`` as they are
produced, so memory stays bounded by one read block however large the corpus.
``manifest.json`` is written last and atomically: a directory without one is
an unfinished preparation, never a silently short corpus.

Trade-offs chosen:

* Files are read in line-aligned blocks with an incremental UTF-8 decoder
  (invalid bytes become U+FFFD), so a multi-gigabyte file never has to fit in
  memory. For BPE this means the exact ids depend on the (fixed) block size,
  which keeps output deterministic but is not identical to encoding each file
  in one call; decoding is unaffected.
* BPE needs two passes over the input (train, then encode). Training on the
  very files being prepared keeps the vocabulary matched to the corpus at the
  price of reading it twice.
* Selection is deterministic: files are de-duplicated and sorted by resolved
  path, hidden files and directories (a leading ``.``) are skipped while
  walking, and the ``include`` glob filters files found inside directories -
  a file named explicitly as an input is always taken.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trainer.atomic import TMP_SUFFIX, write_json_atomic
from trainer.data.dataset import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    TOKENS_NAME,
)
from trainer.data.tokenizer import (
    MIN_BPE_VOCAB,
    TOKENIZER_NAMES,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
)
from trainer.errors import DataError

_BLOCK_BYTES = 1 << 20
# The only names a prepared directory may hold; anything else means the output
# directory belongs to someone else and must not be clobbered.
_OWNED_NAMES = frozenset(
    name + suffix
    for name in (MANIFEST_NAME, TOKENS_NAME, TOKENIZER_NAME)
    for suffix in ("", TMP_SUFFIX)
)


def prepare_corpus(
    inputs: Sequence[str | Path],
    output: str | Path,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    include: str = "*",
    max_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode ``inputs`` into ``output`` (tokens.bin, manifest.json, and tokenizer.json for bpe).

    ``vocab_size`` applies to bpe only (the byte tokenizer always has 257).
    ``max_bytes`` stops taking files once that many input bytes were taken
    (whole files, so the total may overshoot by part of one file). Returns the
    manifest that was written.
    """
    output = Path(output)
    _check_args(tokenizer, vocab_size, include, max_bytes)
    files = _select_files(_discover_files(inputs, include, output), max_bytes, inputs)
    _check_output(output)
    tok = _build_tokenizer(tokenizer, vocab_size, files, progress)
    _reset_output(output)
    if isinstance(tok, BPETokenizer):
        tok.save(output / TOKENIZER_NAME)
    stats = _write_tokens(files, tok, output, progress)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        **stats,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "include": include,
        "max_bytes": max_bytes,
    }
    write_json_atomic(output / MANIFEST_NAME, manifest, indent=2)
    return manifest


def _check_args(tokenizer: str, vocab_size: int, include: str, max_bytes: int | None) -> None:
    if tokenizer not in TOKENIZER_NAMES:
        raise DataError(
            f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZER_NAMES)}"
        )
    if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB:
        raise DataError(
            f"bpe vocab_size {vocab_size} is too small; it needs at least {MIN_BPE_VOCAB} "
            "(256 bytes + end-of-document)"
        )
    if not include:
        raise DataError("include glob must not be empty (use '*' for every file)")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")


def _discover_files(inputs: Sequence[str | Path], include: str, output: Path) -> list[Path]:
    if isinstance(inputs, (str, Path)) or not inputs:
        raise DataError("prepare needs a non-empty list of input files or directories")
    skip = output.resolve()
    found: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input path {path} does not exist")
        if path.is_file():
            found.add(path.resolve())
            continue
        for root, dirs, names in os.walk(path):
            # Pruning in place stops os.walk descending into hidden dirs (.git, caches).
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                if not name.startswith(".") and fnmatch.fnmatch(name, include):
                    found.add(Path(root, name).resolve())
    # The output may sit inside an input directory; its own files are never input.
    files = sorted((f for f in found if not f.is_relative_to(skip)), key=lambda f: f.as_posix())
    if not files:
        where = ", ".join(str(p) for p in inputs)
        raise DataError(f"no files matched include glob {include!r} under {where}")
    return files


def _select_files(
    files: list[Path], max_bytes: int | None, inputs: Sequence[str | Path]
) -> list[tuple[Path, int]]:
    sized = [(f, f.stat().st_size) for f in files]
    nonempty = [(f, size) for f, size in sized if size > 0]
    if not nonempty:
        where = ", ".join(str(p) for p in inputs)
        raise DataError(f"all {len(files)} matched file(s) under {where} are empty")
    if max_bytes is None:
        return nonempty
    selected: list[tuple[Path, int]] = []
    total = 0
    for f, size in nonempty:
        if total >= max_bytes:
            break
        selected.append((f, size))
        total += size
    return selected


def _check_output(output: Path) -> None:
    """Refuse any output that is not new, empty, or a previous preparation; change nothing."""
    if not output.exists():
        return
    if not output.is_dir():
        raise DataError(f"output {output} exists and is not a directory")
    foreign = sorted(set(os.listdir(output)) - _OWNED_NAMES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(
            f"output directory {output} is not empty and is not a prepared data directory "
            f"(it holds {shown}); refusing to overwrite it - choose a new or empty directory"
        )
    manifest = output / MANIFEST_NAME
    if manifest.exists() and _manifest_format(manifest) != FORMAT_NAME:
        raise DataError(
            f"output directory {output} holds a {MANIFEST_NAME} that megamoe did not write; "
            "refusing to overwrite it - choose a new or empty directory"
        )


def _manifest_format(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _reset_output(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    # The manifest goes first: if this run dies part-way, the directory must read
    # as unfinished rather than as the old corpus described by a stale manifest.
    for name in sorted(_OWNED_NAMES, key=lambda n: n != MANIFEST_NAME):
        (output / name).unlink(missing_ok=True)


def _build_tokenizer(
    name: str, vocab_size: int, files: list[tuple[Path, int]], progress: bool
) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    with _bytes_bar(files, "train bpe", progress) as bar:
        texts = (text for f, _ in files for text in _iter_text_blocks(f, bar.update))
        return BPETokenizer.train(texts, vocab_size)


def _write_tokens(
    files: list[tuple[Path, int]], tok: Tokenizer, output: Path, progress: bool
) -> dict[str, Any]:
    dtype_name = "uint16" if tok.vocab_size <= 65535 else "uint32"
    dtype = DTYPES[dtype_name]
    eos = np.array([tok.eos_id], dtype=dtype).tobytes()
    digest = hashlib.sha256()
    num_tokens = 0
    source_bytes = 0

    def count(n: int) -> None:
        nonlocal source_bytes
        source_bytes += n
        bar.update(n)

    tmp = output / (TOKENS_NAME + TMP_SUFFIX)
    with open(tmp, "wb") as fh, _bytes_bar(files, "tokenize", progress) as bar:
        for path, _ in files:
            for text in _iter_text_blocks(path, count):
                chunk = tok.encode_array(text).astype(dtype).tobytes()
                fh.write(chunk)
                digest.update(chunk)
                num_tokens += len(chunk) // dtype.itemsize
            fh.write(eos)
            digest.update(eos)
            num_tokens += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, output / TOKENS_NAME)
    return {
        "dtype": dtype_name,
        "num_tokens": num_tokens,
        "num_documents": len(files),
        "source_bytes": source_bytes,
        "sha256": digest.hexdigest(),
    }


def _bytes_bar(files: list[tuple[Path, int]], desc: str, progress: bool) -> tqdm:
    total = sum(size for _, size in files)
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
    )


def _iter_text_blocks(path: Path, on_bytes: Callable[[int], None]) -> Iterator[str]:
    """Yield ``path``'s text in blocks that end after a newline (except, possibly, the last)."""
    # An incremental decoder keeps a multi-byte character split across two reads intact.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK_BYTES):
            on_bytes(len(block))
            text = carry + decoder.decode(block)
            cut = text.rfind("\n") + 1
            # A very long line is flushed anyway rather than growing without bound.
            if cut == 0 and len(text) < 4 * _BLOCK_BYTES:
                carry = text
                continue
            cut = cut or len(text)
            yield text[:cut]
            carry = text[cut:]
    tail = carry + decoder.decode(b"", final=True)
    if tail:
        yield tail
