"""Training data: tokenizers, corpus preparation, the prepared-token reader, batch sampling.

The pipeline is ``prepare_corpus`` (text files -> ``tokens.bin`` + ``manifest.json``)
once, then per run ``TokenData.open`` (memory-map the tokens) and a
``BatchSampler`` whose ``next_starts`` feed ``batch_from_starts``. Every problem
a user can cause surfaces as :class:`trainer.errors.DataError` naming the path.
torch is imported only when a batch is built, so preparing data stays light.
"""

from trainer.data.dataset import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    TOKENS_NAME,
    TokenData,
    read_manifest,
)
from trainer.data.prepare import prepare_corpus
from trainer.data.sampler import BatchSampler, batch_from_starts
from trainer.data.tokenizer import (
    EOS_TEXT,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "EOS_TEXT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "TOKENS_NAME",
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "TokenData",
    "Tokenizer",
    "batch_from_starts",
    "load_tokenizer",
    "prepare_corpus",
    "read_manifest",
]
