"""The model's parameters as one table: every logical tensor of a ModelConfig, its shape, its
tensor-parallel split, its initialisation and its role.

Everything that needs a parameter fact reads it here: the model's initialisation
(megagrow.model.gpt), the growth maps (megagrow.growth.ops declares maps against
`logical_tensors`), the checkpoint reader and the shard-to-shard executor (`partition_dim`),
and the parameter counts (ModelConfig.num_params, hence the FLOP ledger and the stop rule).
tests/unit/test_params.py pins the table to the model megagrow.model.gpt builds: the same names
in the same order, the same shapes, and the split megatron-core's layers put on each parameter.

A logical tensor is the unsharded tensor; over tensor parallelism (TP) a parameter with a
`split` is the concatenation of the TP ranks' shards along that dim (megatron-core:
ColumnParallelLinear's weight and bias and VocabParallelEmbedding's weight split dim 0,
RowParallelLinear's weight dim 1, its bias is replicated). Names are the model's parameter
names; a block's tensors are named `blocks.{i}.` + the name relative to the block.

No torch, no megatron: config (the bottom room) reads it for the parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """What a tensor is, by its name relative to the model or to its block.

    split: the TP partition dim (None: replicated over the TP group).
    init: "normal" (N(0, init_std)), "normal_scaled" (N(0, init_std / sqrt(2 n_layers)), the
        output projections onto the residual stream, GPT-2's scaling), "zeros", "ones".
    embedding: counted out of the non-embedding parameters (token and position embeddings,
        the untied LM head).
    output: part of an output projection onto the residual stream (attn.o, mlp.fc2, mlp.down,
        weights and biases): zero it and the block adds nothing (depth growth's identity layers).
    """

    split: int | None
    init: str
    embedding: bool = False
    output: bool = False


_COL_W, _COL_B = Rule(0, "normal"), Rule(0, "zeros")
_ROW_W, _ROW_B = Rule(1, "normal_scaled", output=True), Rule(None, "zeros", output=True)
_GAIN, _BIAS = Rule(None, "ones"), Rule(None, "zeros")

RULES: dict[str, Rule] = {
    "tok_emb.weight": Rule(0, "normal", embedding=True),
    "pos_emb.weight": Rule(None, "normal", embedding=True),
    "lm_head.weight": Rule(0, "normal", embedding=True),
    "ln_f.weight": _GAIN,
    "ln_f.bias": _BIAS,
    # relative to a block
    "ln1.weight": _GAIN,
    "ln1.bias": _BIAS,
    "ln2.weight": _GAIN,
    "ln2.bias": _BIAS,
    "attn.q.weight": _COL_W,
    "attn.q.bias": _COL_B,
    "attn.k.weight": _COL_W,
    "attn.k.bias": _COL_B,
    "attn.v.weight": _COL_W,
    "attn.v.bias": _COL_B,
    "attn.o.weight": _ROW_W,
    "attn.o.bias": _ROW_B,
    "mlp.fc1.weight": _COL_W,
    "mlp.fc1.bias": _COL_B,
    "mlp.fc2.weight": _ROW_W,
    "mlp.fc2.bias": _ROW_B,
    "mlp.gate.weight": _COL_W,
    "mlp.up.weight": _COL_W,
    "mlp.down.weight": _ROW_W,
}


def relative(name: str) -> str:
    """`blocks.3.attn.q.weight` -> `attn.q.weight`; other names unchanged."""
    if name.startswith("blocks."):
        return name.split(".", 2)[2]
    return name


def rule(name: str) -> Rule:
    try:
        return RULES[relative(name)]
    except KeyError:
        raise KeyError(f"{name!r} is not a parameter of megagrow's model") from None


def partition_dim(name: str) -> int | None:
    """The TP split dim of logical tensor `name` (None: replicated)."""
    return rule(name).split


def block_tensors(c) -> dict[str, tuple]:
    """Shapes of one block's tensors of config `c`, by name relative to `blocks.{i}.`, in model order."""
    d, f, a, kv = c.d_model, c.ffn_dim, c.n_heads * c.head_dim, c.kv_dim
    gpt2 = c.flavour == "gpt2"
    t: dict[str, tuple] = {"ln1.weight": (d,)}
    if gpt2:
        t["ln1.bias"] = (d,)
    for p, rows in (("q", a), ("k", kv), ("v", kv)):
        t[f"attn.{p}.weight"] = (rows, d)
        if gpt2:
            t[f"attn.{p}.bias"] = (rows,)
    t["attn.o.weight"] = (d, a)
    if gpt2:
        t["attn.o.bias"] = (d,)
    t["ln2.weight"] = (d,)
    if gpt2:
        t["ln2.bias"] = (d,)
        t.update({"mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,)})
    else:
        t.update({"mlp.gate.weight": (f, d), "mlp.up.weight": (f, d), "mlp.down.weight": (d, f)})
    return t


def logical_tensors(c) -> dict[str, tuple]:
    """{name: logical (unsharded) shape} of every parameter of the model of config `c`, in the
    order of the model's named_parameters()."""
    d = c.d_model
    t: dict[str, tuple] = {"tok_emb.weight": (c.padded_vocab, d)}
    if c.flavour == "gpt2":
        t["pos_emb.weight"] = (getattr(c, "max_positions", None) or c.seq_len, d)  # ModelConfig.n_positions rows
    block = block_tensors(c)
    for i in range(c.n_layers):
        for k, s in block.items():
            t[f"blocks.{i}.{k}"] = s
    t["ln_f.weight"] = (d,)
    if c.flavour == "gpt2":
        t["ln_f.bias"] = (d,)
    if not c.tie_embeddings:
        t["lm_head.weight"] = (c.padded_vocab, d)
    return t


def num_params(c, embeddings: bool = True) -> int:
    """Exact parameter count of the logical model (embeddings=False: without the token and
    position embeddings and the untied LM head)."""
    return sum(math.prod(s) for n, s in logical_tensors(c).items() if embeddings or not rule(n).embedding)


def init_std(c, name: str) -> float:
    """The standard deviation of a normal-initialised tensor's entries."""
    r = rule(name)
    if r.init == "normal_scaled":
        return c.init_std / math.sqrt(2 * c.n_layers)
    if r.init == "normal":
        return c.init_std
    raise ValueError(f"{name} is initialised to constant {r.init}, not drawn")


def kaplan_params(n_layers: int, d_model: int) -> float:
    """Kaplan et al.'s non-embedding parameter count 12 n_layers d_model^2: the table's
    non-embedding count of a GPT-2 block stack (attention 4 d^2, MLP 8 d^2 with d_ff = 4 d)
    without its biases and norms (13 L d + 2 d more; tested). The scaling law and the
    reference peak-LR rule are stated in it."""
    return 12.0 * int(n_layers) * float(int(d_model)) ** 2
