"""A sentencepiece BPE tokenizer: training it (deterministically) and using it.

Settings, chosen so that ``decode(encode(text)) == text`` for any text, code included:

- ``model_type=bpe``, ``byte_fallback=True`` (a character the vocabulary lacks is spelled in
  its UTF-8 bytes ``<0x..>``, never ``<unk>``), ``character_coverage=1.0``;
- ``normalization_rule_name=identity``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: no text is changed or added, so encodings concatenate exactly;
- ``allow_whitespace_only_pieces=True`` (indentation runs become single pieces),
  ``split_digits=True``;
- ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (EOS, which the dataset appends after every
  document), then the 256 byte pieces, then the learned pieces.

Training sentences are blocks of consecutive lines of the input documents (a block ends at a
blank line or before it would exceed ``max_sentence_length`` bytes; a single line longer than
that is skipped), so that newlines inside a block are learned too. At most ``max_sentences``
of them are used, drawn by sentencepiece's seeded reservoir sampling
(``input_sentence_size`` + ``shuffle_input_sentence``): the same files, vocabulary size and
seed give the same model, byte for byte.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from megagrow.data.corpus import read_documents
from megagrow.errors import UserError
from megagrow.fsutil import write_file_atomic

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_BYTE_PIECES = 256
# 3 special pieces + 256 byte pieces + room for the characters and a few merges.
MIN_VOCAB_SIZE = 320
MAX_VOCAB_SIZE = 1 << 20
DEFAULT_MAX_SENTENCE_LENGTH = 4192  # bytes (sentencepiece's own default)


def training_sentences(files: Iterable[str], max_sentence_length: int = DEFAULT_MAX_SENTENCE_LENGTH) -> Iterator[str]:
    """Blocks of lines of every document of ``files``, in order (see the module docstring)."""
    for path in files:
        for doc in read_documents(path):
            block: list[str] = []
            size = 0
            for line in doc.splitlines(keepends=True):
                nbytes = len(line.encode("utf-8", errors="replace"))
                if nbytes > max_sentence_length:
                    continue
                if block and (size + nbytes > max_sentence_length or not line.strip()):
                    text = "".join(block)
                    if text.strip():
                        yield text
                    block, size = [], 0
                block.append(line)
                size += nbytes
            text = "".join(block)
            if text.strip():
                yield text


class _Guarded:
    """An iterator for sentencepiece that records (instead of losing) exceptions of ``it``."""

    def __init__(self, it: Iterator[str]):
        self.it = it
        self.error: BaseException | None = None
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.error is not None:
            raise StopIteration
        try:
            s = next(self.it)
        except StopIteration:
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised after training returns
            self.error = e
            raise StopIteration from None
        self.count += 1
        return s


def _check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"vocab size {vocab_size} is out of range: it must be between "
            f"{MIN_VOCAB_SIZE} (3 special + {NUM_BYTE_PIECES} byte pieces + characters)"
            " "
            f"and {MAX_VOCAB_SIZE}"
        )


def train_tokenizer(
    files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    max_sentences: int = 300_000,
    seed: int = 0,
    *,
    max_sentence_length: int = DEFAULT_MAX_SENTENCE_LENGTH,
    num_threads: int = 2,
    verbose: bool = False,
) -> str:
    """Train BPE on ``files``, write ``model_prefix + ".model"`` atomically, return its path.

    Deterministic in (files, vocab_size, max_sentences, seed, max_sentence_length). A failure
    leaves no file behind. Raises UserError for an impossible vocabulary size or no text.
    """
    _check_vocab_size(vocab_size)
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    model_path = model_prefix + ".model"
    out_dir = os.path.dirname(os.path.abspath(model_path))
    if not os.path.isdir(out_dir):
        raise UserError(f"output directory does not exist: {out_dir}")

    sentences = _Guarded(training_sentences(files, max_sentence_length))
    try:
        first = next(sentences)
    except StopIteration:
        if sentences.error is not None:
            raise sentences.error from None
        raise UserError("no text to train the tokenizer on (all inputs are empty)") from None

    def with_first() -> Iterator[str]:
        yield first
        yield from sentences

    buf = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=with_first(),
            model_writer=buf,
            model_type="bpe",
            vocab_size=int(vocab_size),
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            input_sentence_size=int(max_sentences),
            shuffle_input_sentence=True,
            max_sentence_length=int(max_sentence_length),
            num_threads=int(num_threads),
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        if sentences.error is not None:
            raise sentences.error from None
        msg = " ".join(str(e).split())
        # sentencepiece prefixes its messages with "Internal: src/...cc(123) [check] ".
        hint = msg.rsplit("] ", 1)[-1]
        m = re.search(r"required_chars\. (\d+) vs (\d+)", hint)
        if m:
            raise UserError(
                f"vocab size {vocab_size} is too small for this text: its characters "
                f"alone need {m.group(2)} pieces (special + byte + one per distinct "
                f"character); use a vocab size of at least {m.group(2)}"
            ) from None
        raise UserError(f"tokenizer training failed (vocab size {vocab_size}): {hint}") from None
    if sentences.error is not None:
        raise sentences.error

    write_file_atomic(model_path, buf.getvalue())
    return model_path


class Tokenizer:
    """A trained sentencepiece model: ``encode``/``decode`` between text and token ids."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise UserError(f"tokenizer model not found: {model_path}")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(model_path)
        except (OSError, RuntimeError):
            raise UserError(f"not a sentencepiece model: {model_path}") from None
        if self.sp.eos_id() < 0:
            raise UserError(f"tokenizer {model_path} has no EOS piece (</s>)")

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed by sentencepiece on ``num_threads`` threads."""
        return self.sp.encode(list(texts), out_type=int, num_threads=int(num_threads))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (any int iterable, numpy arrays included); EOS decodes to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


EOS_PIECES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class JsonTokenizer:
    """A Hugging Face ``tokenizer.json`` (the `tokenizers` library, installed with the `hf`
    extra) with the interface of ``Tokenizer``. Its end-of-document id is the first of
    ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>`` it has."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise UserError(f"tokenizer not found: {path}")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise UserError("a tokenizer.json needs the `tokenizers` package: pip install 'megagrow[hf]'") from None
        try:
            self.tok = _HF.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise UserError(f"not a tokenizer.json: {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.path = path
        vocab = self.tok.get_vocab(with_added_tokens=True)
        eos = next((p for p in EOS_PIECES if p in vocab), None)
        if eos is None:
            raise UserError(f"tokenizer {path} has no end-of-document token (one of {', '.join(EOS_PIECES)})")
        self._eos = int(vocab[eos])

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"JsonTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str):
    """A sentencepiece ``.model`` (Tokenizer) or a Hugging Face ``tokenizer.json`` (JsonTokenizer)."""
    return JsonTokenizer(path) if path.endswith(".json") else Tokenizer(path)
