"""A prepared token directory, opened for training.

A prepared directory holds ``tokens.bin`` (every document's token ids followed
by the end-of-document id, as raw little-endian unsigned integers) and
``manifest.json``, which is written last and says how to read the tokens. This
module owns that on-disk contract: the file names, the manifest schema, and
:class:`TokenData`, which memory-maps the tokens read-only.

Trade-off: the tokens are memory-mapped rather than loaded, so opening a
corpus of billions of tokens is instant and costs no resident memory; the price
is that a file truncated after opening would fault at read time, which is why
:meth:`TokenData.open` checks the size against the manifest up front and offers
an (O(corpus)) sha256 check behind ``verify=True``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import DataError

MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.bin"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_NAME = "megamoe-tokens"
FORMAT_VERSION = 1

# Explicit little-endian so a directory prepared on one machine reads the same on any other.
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}

_REQUIRED_FIELDS: dict[str, type] = {
    "version": int,
    "tokenizer": str,
    "vocab_size": int,
    "eos_id": int,
    "dtype": str,
    "num_tokens": int,
    "sha256": str,
}

_HASH_CHUNK = 16 << 20


def _prepare_hint(path: Path) -> str:
    return f"run `megamoe data prepare --input <corpus> --output {path}`"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate ``path/manifest.json``; raise :class:`DataError` on any problem."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"prepared data directory {path} does not exist; {_prepare_hint(path)}")
    if not path.is_dir():
        raise DataError(f"prepared data path {path} is not a directory; {_prepare_hint(path)}")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(
            f"{path} is not a prepared data directory (no {MANIFEST_NAME}): it was never "
            f"prepared or preparation did not finish; {_prepare_hint(path)}"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest_path} is not valid JSON ({exc}); re-prepare {path}") from exc
    _validate_manifest(manifest, manifest_path)
    return manifest


def _validate_manifest(manifest: Any, manifest_path: Path) -> None:
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path} must hold a JSON object, got {type(manifest).__name__}")
    missing = [key for key in _REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise DataError(f"{manifest_path} is missing field(s): {', '.join(missing)}")
    for key, kind in _REQUIRED_FIELDS.items():
        value = manifest[key]
        # bool is an int subclass; a `true` token count is corruption, not a number.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(
                f"{manifest_path}: field {key!r} must be {kind.__name__}, got {value!r}"
            )
    if manifest["version"] != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format version {manifest['version']}; this megamoe reads "
            f"version {FORMAT_VERSION}, re-prepare the data"
        )
    if manifest["dtype"] not in DTYPES:
        raise DataError(
            f"{manifest_path}: dtype {manifest['dtype']!r} is not one of {sorted(DTYPES)}"
        )
    if manifest["num_tokens"] < 0 or manifest["vocab_size"] <= 0:
        raise DataError(f"{manifest_path}: num_tokens and vocab_size must be positive")
    if not 0 <= manifest["eos_id"] < manifest["vocab_size"]:
        raise DataError(f"{manifest_path}: eos_id {manifest['eos_id']} is outside the vocabulary")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so a large token file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TokenData:
    """A prepared corpus: a read-only memory map of its token ids plus its manifest."""

    path: Path
    tokens: np.ndarray
    manifest: dict[str, Any] = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def tokenizer_name(self) -> str:
        return str(self.manifest["tokenizer"])

    @property
    def num_documents(self) -> int | None:
        return self.manifest.get("num_documents")

    def __len__(self) -> int:
        return self.num_tokens

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> TokenData:
        """Open a prepared directory; ``verify`` also checks tokens.bin against its sha256."""
        path = Path(path)
        manifest = read_manifest(path)
        tokens_path = path / TOKENS_NAME
        if not tokens_path.is_file():
            raise DataError(f"{path} has a manifest but no {TOKENS_NAME}; re-prepare it")
        dtype = DTYPES[manifest["dtype"]]
        expected = manifest["num_tokens"] * dtype.itemsize
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise DataError(
                f"{tokens_path} is {actual} bytes but the manifest promises "
                f"{manifest['num_tokens']} {manifest['dtype']} tokens ({expected} bytes): "
                f"the file is truncated or corrupt; re-prepare {path}"
            )
        if verify:
            digest = file_sha256(tokens_path)
            if digest != manifest["sha256"]:
                raise DataError(
                    f"{tokens_path} sha256 {digest} does not match the manifest's "
                    f"{manifest['sha256']}: the file is corrupt; re-prepare {path}"
                )
        return cls(
            path=path,
            tokens=_map_tokens(tokens_path, dtype, manifest["num_tokens"]),
            manifest=manifest,
        )


def _map_tokens(tokens_path: Path, dtype: np.dtype, num_tokens: int) -> np.ndarray:
    # numpy cannot memory-map a zero-length file, and an empty corpus needs no map.
    if num_tokens == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(tokens_path, dtype=dtype, mode="r", shape=(num_tokens,))
