"""Data: sentencepiece tokenizer, memory-mapped token dataset, global-sample-index sampler.

- ``train_tokenizer`` / ``Tokenizer``: deterministic byte-fallback BPE (megagrow.data.tokenizer)
- ``DatasetWriter`` / ``TokenDataset``: ``PREFIX.bin`` + ``PREFIX.idx`` (megagrow.data.dataset)
- ``GlobalSampler`` / ``rank_slice`` / ``get_batch``: the data position is a global sample
  index, so it survives a change of DP size (megagrow.data.sampler)
- ``tools/prepare_data.py`` -> ``megagrow.data.prepare.main``

torch is imported only by ``get_batch`` (lazily), so data preparation does not load it.
"""

from megagrow.data.corpus import default_corpus_files, find_input_files, read_documents
from megagrow.data.dataset import DatasetWriter, TokenDataset, dtype_for_vocab
from megagrow.data.sampler import GlobalSampler, get_batch, rank_slice
from megagrow.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DatasetWriter",
    "GlobalSampler",
    "TokenDataset",
    "Tokenizer",
    "default_corpus_files",
    "dtype_for_vocab",
    "find_input_files",
    "get_batch",
    "rank_slice",
    "read_documents",
    "train_tokenizer",
]
