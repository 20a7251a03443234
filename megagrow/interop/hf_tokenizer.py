"""Tokenizers for transformers: a sentencepiece .model or tokenizer.json read as a `tokenizers`
Tokenizer, written as a transformers tokenizer directory."""

from __future__ import annotations

import json
import os

from megagrow.errors import UserError
from megagrow.interop.hf_config import need_hf

EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def load_tokenizer_object(path: str):
    """(tokenizers.Tokenizer, {unk/bos/eos token strings}) from a sentencepiece .model (converted
    following the model's own normalizer settings, so it encodes exactly like sentencepiece)
    or from a tokenizer.json."""
    need_hf()
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found: {path}")
    if path.endswith(".json"):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"not a tokenizer.json: {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        vocab = tok.get_vocab(with_added_tokens=True)
        special = {
            "eos_token": next((t for t in EOS_NAMES if t in vocab), None),
            "bos_token": next((t for t in BOS_NAMES if t in vocab), None),
        }
        return tok, {k: v for k, v in special.items() if v}
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UserError(f"not a sentencepiece model: {path}") from None
    if not proto.pieces:
        raise UserError(f"not a sentencepiece model: {path}")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise UserError(f"{path}: sentencepiece model type {proto.trainer_spec.model_type} is not supported (BPE or unigram)")
    if proto.trainer_spec.model_type == 1:
        tok = SpmConverter.build_tokenizer_from_spm_proto(proto, [(p.piece, p.score) for p in proto.pieces], legacy=False)
    else:
        tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    ts = proto.trainer_spec
    special = {
        "unk_token": ts.unk_piece if ts.unk_id >= 0 else None,
        "bos_token": ts.bos_piece if ts.bos_id >= 0 else None,
        "eos_token": ts.eos_piece if ts.eos_id >= 0 else None,
    }
    return tok, {k: v for k, v in special.items() if v}


TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # the tokenizer.json class of transformers 4.x; 5.x maps it to TokenizersBackend


def write_tokenizer(path: str, out_dir: str, model_vocab: int, model_max_length: int | None = None) -> dict:
    """Write `path` (sentencepiece .model or tokenizer.json) into `out_dir` as a tokenizer that
    transformers' AutoTokenizer 4.x and 5.x load (tokenizer.json + tokenizer_config.json naming
    PreTrainedTokenizerFast; a .model is also copied as tokenizer.model). model_max_length: the
    model's position capacity, so that truncation=True cuts to what the model can take.
    Returns {vocab_size, bos_token_id, eos_token_id, source}."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    tok, special = load_tokenizer_object(path)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > model_vocab:
        raise UserError(f"tokenizer {path} has {n} tokens, more than the model's vocab_size {model_vocab}")
    extra = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special, **extra)
    fast.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tc = json.load(f)
    tc["tokenizer_class"] = TOKENIZER_CLASS  # 5.x writes its own name, TokenizersBackend, which 4.x cannot load
    with open(cfg_path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True)
        f.write("\n")
    if not path.endswith(".json"):
        shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
    return {"source": os.path.abspath(path), "vocab_size": n, "bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id}
