"""megagrow checkpoint -> Megatron-LM checkpoint (megatron-core GPTModel, local layer spec), and back.

Names and layouts (megatron-core's GPTModel built with `get_gpt_layer_local_spec`, tensor parallel 1):

    megagrow                                   megatron-core GPTModel
    tok_emb.weight (padded vocab rows)         embedding.word_embeddings.weight
    pos_emb.weight (gpt2)                      embedding.position_embeddings.weight
    blocks.i.ln1 (weight, gpt2: bias)          decoder.layers.i.input_layernorm
    q, k, v of group g, g = 0 .. G-1           decoder.layers.i.self_attention.linear_qkv (weight, gpt2: bias):
                                               per query group g the rows [q heads of g | k head g | v head g]
    blocks.i.attn.o                            decoder.layers.i.self_attention.linear_proj
    blocks.i.ln2                               decoder.layers.i.pre_mlp_layernorm
    cat(mlp.gate, mlp.up) (llama) / mlp.fc1    decoder.layers.i.mlp.linear_fc1 (gated: gate rows first)
    mlp.down (llama) / mlp.fc2                 decoder.layers.i.mlp.linear_fc2
    ln_f                                       decoder.final_layernorm
    lm_head.weight (untied only)               output_layer.weight

G = n_kv_heads (num_query_groups; n_heads for multi-head attention). The linear layers' `_extra_state`
entries (None), which megatron-core's own state_dict has, are written too, so that
`load_state_dict(strict=True)` accepts the dict. The vocabulary keeps megagrow's padding to a
multiple of 128 (Megatron-LM pads its vocabulary the same way: `--make-vocab-size-divisible-by 128`).

On disk (Megatron-LM's legacy `torch` checkpoint format, tensor and pipeline parallel 1):

    OUT/latest_checkpointed_iteration.txt       the iteration, e.g. "300"
    OUT/iter_0000300/mp_rank_00/model_optim_rng.pt   {"model": state dict, "iteration": 300,
                                                      "checkpoint_version": 3.0}
    OUT/megagrow.json                           the source and the Megatron-LM arguments of the model

The payload carries no `args`, optimizer or RNG state: Megatron-LM loads it with `--finetune` (or
`--no-load-optim --no-load-rng`) and `--ckpt-format torch`, the model given by the arguments in
megagrow.json (`megatron_args`). checkpoint_version 3.0 says the QKV rows are in the per-group
layout above (no reordering on load).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.fsutil import publish_dir

if TYPE_CHECKING:
    import torch

CHECKPOINT_VERSION = 3.0
TRACKER = "latest_checkpointed_iteration.txt"
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def check_megatron_exportable(m: ModelConfig) -> None:
    """One-line UserError for what megatron-core's GPTModel (local spec) does not compute like megagrow."""
    if m.rope_scaling is not None:
        raise UserError(
            f"export-megatron: rope_scaling {m.rope_scaling.rope_type!r} is not exported (megatron-core's "
            "RoPE scaling options differ from transformers'; plain RoPE only)"
        )


def megatron_args(m: ModelConfig) -> dict:
    """Megatron-LM's command-line arguments (as a dict, flag name -> value; True: a bare flag) that build
    model `m`: pass them with the data/training arguments of your run."""
    a = {
        "num-layers": m.n_layers,
        "hidden-size": m.d_model,
        "ffn-hidden-size": m.ffn_dim,
        "num-attention-heads": m.n_heads,
        "kv-channels": m.head_dim,
        "seq-length": m.seq_len,
        "max-position-embeddings": m.n_positions,
        "norm-epsilon": m.norm_eps,
        "make-vocab-size-divisible-by": 128,
        "padded-vocab-size": m.padded_vocab,
        "vocab-size": m.vocab_size,
        "transformer-impl": "local",
        "ckpt-format": "torch",
        "finetune": True,
    }
    if m.flavour == "llama":
        a.update(
            {
                "normalization": "RMSNorm",
                "swiglu": True,
                "disable-bias-linear": True,
                "position-embedding-type": "rope",
                "rotary-percent": 1.0,
                "rotary-base": int(m.rope_theta) if float(m.rope_theta).is_integer() else m.rope_theta,
            }
        )
        if m.n_kv_heads is not None:
            a.update({"group-query-attention": True, "num-query-groups": m.n_kv_heads})
    else:
        a.update({"normalization": "LayerNorm", "openai-gelu": True, "position-embedding-type": "learned_absolute"})
    if not m.tie_embeddings:
        a["untie-embeddings-and-output-weights"] = True
    return a


def _groups(m: ModelConfig) -> tuple[int, int, int]:
    """(query groups, query heads per group, head_dim)."""
    g = m.kv_heads
    return g, m.n_heads // g, m.head_dim


def _qkv(m: ModelConfig, q, k, v):
    """megatron's fused QKV rows (or bias) from megagrow's q, k, v: per group [its q heads | k | v]."""
    import torch

    g, per, hd = _groups(m)
    rest = q.shape[1:]
    q = q.reshape(g, per * hd, *rest)
    k, v = k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * hd, *rest)


def _split_qkv(m: ModelConfig, qkv):
    """megagrow's q, k, v from megatron's fused QKV rows (or bias)."""
    g, per, hd = _groups(m)
    rest = qkv.shape[1:]
    t = qkv.reshape(g, (per + 2) * hd, *rest)
    q, k, v = t[:, : per * hd], t[:, per * hd : (per + 1) * hd], t[:, (per + 1) * hd :]
    return q.reshape(g * per * hd, *rest), k.reshape(g * hd, *rest), v.reshape(g * hd, *rest)


def to_megatron(m: ModelConfig, read: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron-core name, tensor) of every weight of model `m` (`read(name)`: megagrow's logical fp32 tensor)."""
    import torch

    gpt2 = m.flavour == "gpt2"
    yield "embedding.word_embeddings.weight", read("tok_emb.weight")
    if gpt2:
        yield "embedding.position_embeddings.weight", read("pos_emb.weight")
    norms = ("weight", "bias") if gpt2 else ("weight",)
    for i in range(m.n_layers):
        b, h = f"blocks.{i}.", f"decoder.layers.{i}."
        for p in norms:
            yield h + f"input_layernorm.{p}", read(b + f"ln1.{p}")
        for p in norms:
            yield h + f"self_attention.linear_qkv.{p}", _qkv(m, *(read(b + f"attn.{x}.{p}") for x in "qkv"))
            yield h + f"self_attention.linear_proj.{p}", read(b + f"attn.o.{p}")
        for p in norms:
            yield h + f"pre_mlp_layernorm.{p}", read(b + f"ln2.{p}")
        if gpt2:
            for p in norms:
                yield h + f"mlp.linear_fc1.{p}", read(b + f"mlp.fc1.{p}")
                yield h + f"mlp.linear_fc2.{p}", read(b + f"mlp.fc2.{p}")
        else:
            yield h + "mlp.linear_fc1.weight", torch.cat([read(b + "mlp.gate.weight"), read(b + "mlp.up.weight")], 0)
            yield h + "mlp.linear_fc2.weight", read(b + "mlp.down.weight")
    for p in norms:
        yield f"decoder.final_layernorm.{p}", read(f"ln_f.{p}")
    if not m.tie_embeddings:
        yield "output_layer.weight", read("lm_head.weight")


def extra_state_keys(m: ModelConfig) -> list[str]:
    """The `_extra_state` entries of megatron-core's local-spec GPTModel state dict (None values)."""
    keys = [f"decoder.layers.{i}.{lin}._extra_state" for i in range(m.n_layers) for lin in _LINEARS]
    return keys + ["output_layer._extra_state"]  # the output layer exists tied too (its weight is the embedding's)


def megatron_state_dict(m: ModelConfig, read: Callable[[str], torch.Tensor]) -> dict:
    """The whole megatron-core state dict of model `m` (contiguous fp32 tensors and the None extra states)."""
    sd: dict = {n: t.detach().float().contiguous().clone() for n, t in to_megatron(m, read)}
    sd.update(dict.fromkeys(extra_state_keys(m)))
    return sd


def from_megatron(m: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megagrow's logical fp32 tensors of model `m` from a megatron-core state dict (`get(name)`)."""
    gpt2 = m.flavour == "gpt2"
    norms = ("weight", "bias") if gpt2 else ("weight",)
    P = {"tok_emb.weight": get("embedding.word_embeddings.weight")}
    if gpt2:
        P["pos_emb.weight"] = get("embedding.position_embeddings.weight")
    for i in range(m.n_layers):
        b, h = f"blocks.{i}.", f"decoder.layers.{i}."
        for p in norms:
            P[b + f"ln1.{p}"], P[b + f"ln2.{p}"] = get(h + f"input_layernorm.{p}"), get(h + f"pre_mlp_layernorm.{p}")
            P[b + f"attn.q.{p}"], P[b + f"attn.k.{p}"], P[b + f"attn.v.{p}"] = _split_qkv(m, get(h + f"self_attention.linear_qkv.{p}"))
            P[b + f"attn.o.{p}"] = get(h + f"self_attention.linear_proj.{p}")
            if gpt2:
                P[b + f"mlp.fc1.{p}"], P[b + f"mlp.fc2.{p}"] = get(h + f"mlp.linear_fc1.{p}"), get(h + f"mlp.linear_fc2.{p}")
        if not gpt2:
            P[b + "mlp.gate.weight"], P[b + "mlp.up.weight"] = get(h + "mlp.linear_fc1.weight").chunk(2, 0)
            P[b + "mlp.down.weight"] = get(h + "mlp.linear_fc2.weight")
    for p in norms:
        P[f"ln_f.{p}"] = get(f"decoder.final_layernorm.{p}")
    if not m.tie_embeddings:
        P["lm_head.weight"] = get("output_layer.weight")
    return {n: t.float().contiguous() for n, t in P.items()}


def checkpoint_file(out: str, iteration: int) -> str:
    return os.path.join(out, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt")


def write_megatron(out: str, m: ModelConfig, read: Callable[[str], torch.Tensor], iteration: int, source: dict) -> dict:
    """Write the Megatron-LM checkpoint directory `out` (which must not exist or be empty) of model `m`, atomically:
    everything goes to OUT.export-tmp, renamed at the end; on any failure nothing is left. Returns the summary."""
    import torch

    check_megatron_exportable(m)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise UserError(f"--iteration must be an integer >= 0, got {iteration!r}")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"output {out} exists and is not an empty directory; refusing to overwrite")
    with publish_dir(out) as tmp:
        sd = megatron_state_dict(m, read)
        path = checkpoint_file(tmp, iteration)
        os.makedirs(os.path.dirname(path))
        torch.save({"model": sd, "iteration": iteration, "checkpoint_version": CHECKPOINT_VERSION}, path)
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write(f"{iteration}\n")
        with open(os.path.join(tmp, "megagrow.json"), "w") as f:
            json.dump(
                {**source, "model": m.to_dict(), "megatron_args": megatron_args(m), "checkpoint_version": CHECKPOINT_VERSION}, f, indent=1
            )
    n = sum(t.numel() for t in sd.values() if t is not None)
    return {
        "out": out,
        "file": checkpoint_file(out, iteration),
        "iteration": iteration,
        "params": n,
        "bytes_written": os.path.getsize(checkpoint_file(out, iteration)),
    }


def export_megatron(d: str, tag: str, out: str, iteration: int | None = None) -> dict:
    """Tag `tag` of the stage checkpoint directory `d` (any layout; the CLI resolves and verifies it) -> the
    Megatron-LM checkpoint `out`. The iteration is the checkpoint's step unless given."""
    from megagrow.state.checkpoint import SourceCheckpoint

    t0 = time.perf_counter()
    src = SourceCheckpoint.open(d, tag)
    m = src.model
    check_megatron_exportable(m)
    shapes = src.logical_shapes()
    step = int(src.client.get("step") or 0)
    source = {"checkpoint": os.path.abspath(d), "tag": src.tag, "stage": src.client["stage"]["name"], "step": step}
    s = write_megatron(
        out, m, lambda n: src.read_box(n, "w", tuple((0, k) for k in shapes[n])), step if iteration is None else iteration, source
    )
    return {**s, **source, "flavour": m.flavour, "seconds": round(time.perf_counter() - t0, 3)}


def read_megatron(path: str) -> tuple[int, dict]:
    """(iteration, model state dict) of a Megatron-LM legacy checkpoint directory at tensor/pipeline parallel 1
    (the tracker file names the iteration; read with torch.load(weights_only=True): no code in it runs)."""
    import torch

    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        raise UserError(f"{path}: no {TRACKER} (not a Megatron-LM checkpoint directory)")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: iteration {text!r} is not supported (release checkpoints are not read)")
    fn = checkpoint_file(path, int(text))
    if not os.path.isfile(fn):
        raise UserError(f"{path}: {os.path.relpath(fn, path)} not found (only tensor and pipeline parallel 1 is read)")
    import argparse

    try:  # Megatron-LM stores its arguments as an argparse.Namespace: allowed as data, nothing else runs
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"cannot read {fn}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise UserError(f"{fn}: no 'model' state dict")
    return int(text), payload["model"]


# ---------------------------------------------------------------------------------------
# import: `init_from: megatron:PATH`

# ModelConfig fields compared with a stage's model on import (megagrow.json, written by write_megatron)
_COMPARED = (
    "flavour",
    "n_layers",
    "d_model",
    "n_heads",
    "head_dim",
    "kv_heads",
    "ffn_dim",
    "vocab_size",
    "tie_embeddings",
    "norm_eps",
    "rope_theta",
    "rope_scaling",
)  # gpt2's table size: by shape, on import


def check_megatron_dir(path: str, m: ModelConfig, stage: str) -> None:
    """The checks of `init_from: megatron:PATH` that need no torch: the tracker, the checkpoint file, and the
    model recorded in megagrow.json (when there: a Megatron-LM checkpoint megagrow wrote) against the stage's.
    A checkpoint without megagrow.json is checked by its tensors' shapes only, on import."""
    tracker = os.path.join(path, TRACKER)
    if not os.path.isdir(path):
        raise UserError(f"Megatron-LM checkpoint directory not found: {path}")
    if not os.path.isfile(tracker):
        raise UserError(f"{path}: no {TRACKER} (not a Megatron-LM checkpoint directory)")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise UserError(f"{tracker}: iteration {text!r} is not supported (release checkpoints are not read)")
    if not os.path.isfile(checkpoint_file(path, int(text))):
        raise UserError(
            f"{path}: {os.path.relpath(checkpoint_file(path, int(text)), path)} not found (only tensor and pipeline parallel 1 is read)"
        )
    meta = os.path.join(path, "megagrow.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as f:
                theirs = ModelConfig.from_dict(json.load(f)["model"], f"{meta}: model")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta}: not readable ({type(e).__name__}: {e})") from None
        diff = [
            f"{k} {_shown(getattr(theirs, k))!r} (stage: {_shown(getattr(m, k))!r})"
            for k in _COMPARED
            if getattr(theirs, k) != getattr(m, k)
        ]
        if diff:
            raise UserError(f"{path} does not match the model of stage {stage!r}: " + ", ".join(diff))


def _shown(v):
    return v.to_dict() if hasattr(v, "to_dict") else v


class MegatronCheckpoint:
    """A Megatron-LM legacy checkpoint directory (tensor/pipeline parallel 1) as the source of a stage's
    first checkpoint: the importer's interface of HFCheckpoint (path, config, tensors_for)."""

    def __init__(self, path: str):
        self.path = path
        self.iteration, self.sd = read_megatron(path)
        self.config = {"iteration": self.iteration}

    def tensors_for(self, m: ModelConfig, stage: str = "?") -> dict:
        """megagrow's logical tensors for stage model `m`, checked against megagrow.json (when there) and by shape."""
        from megagrow.params import logical_tensors

        check_megatron_dir(self.path, m, stage)

        def get(name):
            if name not in self.sd:
                raise UserError(f"{self.path}: weight {name} is missing (the checkpoint is not stage {stage!r}'s model)")
            return self.sd[name]

        P = from_megatron(m, get)
        for n, s in logical_tensors(m).items():
            if tuple(P[n].shape) != tuple(s):
                raise UserError(f"{self.path}: weight for {n} has shape {tuple(P[n].shape)}, stage {stage!r} needs {tuple(s)}")
        extra = sorted(set(k for k, v in self.sd.items() if v is not None) - set(dict(to_megatron(m, _shape_reader(m)))))
        if extra:
            raise UserError(
                f"{self.path}: weights the stage's model has no place for: {', '.join(extra[:4])}" + (" ..." if len(extra) > 4 else "")
            )
        return P


def _shape_reader(m: ModelConfig):
    import torch

    from megagrow.params import logical_tensors

    shapes = logical_tensors(m)
    return lambda name: torch.empty(shapes[name], device="meta")
