"""A GPT language model on megatron-core's tensor-parallel layers.

Two flavours from one file:
  gpt2  - LayerNorm, learned positions, GELU MLP (fc1, fc2), biases everywhere.
  llama - RMSNorm, rotary positions, SwiGLU MLP (gate, up, down), no biases.

Parallelism: the linear layers are megatron-core's Column/RowParallelLinear and the token
embedding is VocabParallelEmbedding; with tp=1 they are plain linears. Everything else
(norms, positions, residual stream) is replicated over the tensor-parallel group. The
process groups come from megatron.core.parallel_state (megagrow.parallel sets them up).

Parameter names are the *logical* tensor names used by growth and checkpoint tools; a
tensor-parallel parameter carries `partition_dim` (megatron's attribute), and its logical
global tensor is the concatenation of the TP ranks' shards along that dim. Q, K and V are
separate tensors so growth operators can address each; the forward still runs them as one GEMM
(megagrow.model.tp.fused_columns; llama's gate and up too), GPT.fused_qkv off runs each layer on
its own. Rotary embeddings live in megagrow.model.rope, the TP layer pieces in megagrow.model.tp.

Initialisation is layout-independent and drawn shard by shard: entry i (flat index in the
logical tensor) of a parameter is a function of (seed, parameter name, i) only
(megagrow.rng's "normal", megagrow.params says which tensors are drawn and with what std),
so each rank draws just the entries it holds - its TP slice, or under ZeRO-3 (the model
built inside deepspeed.zero.Init) its partition of that slice - and the logical tensors come
out bitwise the same under any layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from megagrow import params, rng
from megagrow.config import RECOMPUTE, ModelConfig, recompute_mode
from megagrow.model import loss
from megagrow.model.rope import apply_rope, rope_tables
from megagrow.model.tp import GatherKV, column, fused_columns, megatron_config, no_init, row, shard_box, sharded


def dropout(x: torch.Tensor, p: float, gen: torch.Generator | None, training: bool) -> torch.Tensor:
    """Dropout with megagrow's own generator (megatron's CUDA RNG tracker does not run on CPU).

    The dropped activations are replicated over the TP group, and every TP rank seeds the
    generator identically, so the masks agree across TP ranks.
    """
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=gen)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    """Multi-head or grouped-query attention (n_kv_heads < n_heads: each K/V head serves
    n_heads / n_kv_heads consecutive query heads). Over TP, the query heads are split; the
    K/V heads are split too when tp divides n_kv_heads, else (tp a multiple of n_kv_heads)
    the K/V weights are still split evenly and each rank gathers the projections and keeps
    its own group's head, as megatron-core's attention does: no parameter is replicated."""

    def __init__(self, c: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        bias = c.flavour == "gpt2"
        self.q = column(mp, c.d_model, c.attn_dim, bias)
        self.k = column(mp, c.d_model, c.kv_dim, bias)
        self.v = column(mp, c.d_model, c.kv_dim, bias)
        self.o = row(mp, c.attn_dim, c.d_model, bias)
        self.head_dim = c.head_dim
        self.rope = c.flavour == "llama"
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.gather_kv = tp > c.kv_heads  # then one K/V head per rank: its query heads' group
        self.kv_group = parallel_state.get_tensor_model_parallel_rank() // (tp // c.kv_heads) if self.gather_kv else 0
        local_kv = 1 if self.gather_kv else c.kv_heads // tp
        self.n_rep = (c.n_heads // tp) // local_kv  # query heads per local K/V head
        self.fused = True  # Q, K, V from one GEMM (fused_columns); the parameters are the same either way

    def qkv(self, x: torch.Tensor) -> tuple:
        """The Q, K and V projections (B, T, *): this rank's query heads, and its K/V heads (with
        gather_kv, the one K/V head its query heads share, gathered from the ranks holding its parts)."""
        if not self.fused:
            q, k, v = self.q(x)[0], self.k(x)[0], self.v(x)[0]
            if self.gather_kv:
                hd, g = self.head_dim, self.kv_group
                k, v = (GatherKV.apply(t)[..., g * hd : (g + 1) * hd] for t in (k, v))
            return q, k, v
        q, k, v = fused_columns([self.q, self.k, self.v], x)
        if self.gather_kv:  # one all-gather for K and V: rank r's part is [k_r, v_r]
            kv = GatherKV.apply(torch.cat([k, v], dim=-1))
            kv = kv.view(*kv.shape[:-1], -1, 2, k.shape[-1])  # (B, T, tp, 2, kv_dim / tp)
            hd, g = self.head_dim, self.kv_group
            k, v = (kv[..., i, :].flatten(-2)[..., g * hd : (g + 1) * hd] for i in (0, 1))
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple | None) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(t):  # (B, T, H_local*hd) -> (B, H_local, T, hd)
            return t.view(B, T, -1, self.head_dim).transpose(1, 2)

        q, k, v = (heads(t) for t in self.qkv(x))
        if self.rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.n_rep > 1:
            k, v = k.repeat_interleave(self.n_rep, dim=1), v.repeat_interleave(self.n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o(y)[0]


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        self.swiglu = c.flavour == "llama"
        if self.swiglu:
            self.gate = column(mp, c.d_model, c.ffn_dim, False)
            self.up = column(mp, c.d_model, c.ffn_dim, False)
            self.down = row(mp, c.ffn_dim, c.d_model, False)
        else:
            self.fc1 = column(mp, c.d_model, c.ffn_dim, True)
            self.fc2 = row(mp, c.ffn_dim, c.d_model, True)
        self.fused = True  # SwiGLU: gate and up from one GEMM (fused_columns), parameters unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = fused_columns([self.gate, self.up], x) if self.fused else (self.gate(x)[0], self.up(x)[0])
            return self.down(F.silu(gate) * up)[0]
        return self.fc2(F.gelu(self.fc1(x)[0], approximate="tanh"))[0]


def norm(c: ModelConfig, dtype: torch.dtype) -> nn.Module:
    if c.flavour == "llama":
        return nn.RMSNorm(c.d_model, eps=c.norm_eps, dtype=dtype)
    return nn.LayerNorm(c.d_model, eps=c.norm_eps, dtype=dtype)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, mp: ModelParallelConfig, dtype: torch.dtype):
        super().__init__()
        self.ln1 = norm(c, dtype)
        self.attn = Attention(c, mp)
        self.ln2 = norm(c, dtype)
        self.mlp = MLP(c, mp)
        self.p = c.dropout
        self.recompute = "none"  # what backward recomputes: none | attention | mlp | full (GPT.activation_checkpointing)

    def forward(self, x, rope, gen):
        if self.recomputes("full"):  # keep only the block's input
            return torch.utils.checkpoint.checkpoint(self.layers, x, rope, gen, use_reentrant=False)
        return self.layers(x, rope, gen)

    def layers(self, x, rope, gen):
        x = x + dropout(self.sublayer("attention", lambda h: self.attn(self.ln1(h), rope), x), self.p, gen, self.training)
        x = x + dropout(self.sublayer("mlp", lambda h: self.mlp(self.ln2(h)), x), self.p, gen, self.training)
        return x

    def sublayer(self, part: str, f, x):
        """f(x); with this part recomputed, only x is kept and f's activations are made again in backward
        (the dropout after it stays outside, so its masks are drawn once)."""
        if self.recomputes(part):
            return torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
        return f(x)

    def recomputes(self, part: str) -> bool:
        return self.recompute == part and self.training and torch.is_grad_enabled()


class GPT(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = c
        mp = megatron_config(dtype)
        self.tok_emb = sharded(tensor_parallel.VocabParallelEmbedding(c.padded_vocab, c.d_model, init_method=no_init, config=mp), 0)
        if c.flavour == "gpt2":
            self.pos_emb = nn.Embedding(c.n_positions, c.d_model, dtype=dtype)
        else:
            cos, sin = rope_tables(c.seq_len, c.head_dim, c.rope_theta, c.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([Block(c, mp, dtype) for _ in range(c.n_layers)])
        self.ln_f = norm(c, dtype)
        if not c.tie_embeddings:
            self.lm_head = column(mp, c.d_model, c.padded_vocab, False)
        self.dropout_gen: torch.Generator | None = None
        self.activation_checkpointing = "none"  # set from the stage config (Stage.activation_checkpointing)
        self.chunked_loss = True  # the loss without fp32 logits of the whole batch (Stage.chunked_loss)

    @property
    def activation_checkpointing(self) -> str:
        """What each block recomputes in backward: none, attention, mlp or full (true/false: full/none)."""
        return self.blocks[0].recompute if len(self.blocks) else "none"

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode) -> None:
        mode = recompute_mode(mode)
        if mode not in RECOMPUTE:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(RECOMPUTE)}, got {mode!r}")
        for block in self.blocks:
            block.recompute = mode

    @property
    def fused_qkv(self) -> bool:
        """Q, K, V (and llama's gate, up) each from one GEMM (Stage.fused_qkv); the parameters are the same."""
        return self.blocks[0].attn.fused if len(self.blocks) else True

    @fused_qkv.setter
    def fused_qkv(self, on: bool) -> None:
        for block in self.blocks:
            block.attn.fused = block.mlp.fused = bool(on)

    def set_dropout_seed(self, seed: int) -> None:
        """Seed this micro-batch's dropout masks (the trainer derives it from the data position)."""
        if self.config.dropout > 0:
            dev = self.ln_f.weight.device
            self.dropout_gen = torch.Generator(device=dev).manual_seed(int(seed) % (2**63))

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states (B, T, d_model) of token ids (B, T)."""
        c = self.config
        x = self.tok_emb(idx)
        rope = None
        if c.flavour == "gpt2":
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        else:
            rope = self.rope(idx.shape[1])
        x = dropout(x, c.dropout, self.dropout_gen, self.training)
        for block in self.blocks:
            x = block(x, rope, self.dropout_gen)
        return self.ln_f(x)

    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables of a T-token forward: the ones built for seq_len, except under dynamic
        scaling when T or seq_len is beyond the original context: then those of T itself (dynamic
        NTK depends on the sequence length; transformers computes them for the forward's length too)."""
        c = self.config
        rs = c.rope_scaling
        if (
            rs is None
            or rs.rope_type != "dynamic"
            or T == self.rope_cos.shape[0]
            or max(T, self.rope_cos.shape[0]) <= rs.original_max_position_embeddings
        ):
            return self.rope_cos, self.rope_sin
        cos, sin = rope_tables(T, c.head_dim, c.rope_theta, rs)
        return cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def head_weight(self) -> torch.Tensor:
        """The LM head (this rank's vocabulary shard): the token embedding when tied."""
        return self.tok_emb.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits (B, T, padded_vocab / tp) of token ids (B, T); the padded columns
        are not masked here (the loss masks them)."""
        x = self.hidden(idx)
        if self.config.tie_embeddings:
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
            return F.linear(x, self.tok_emb.weight)
        return self.lm_head(x)[0]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy over all (B, T) positions; the padded vocabulary rows
        never take probability, and no fp32 logits of the whole batch are kept (megagrow/model/loss.py)
        unless chunked_loss is off (then the whole batch's logits in one piece, for comparison)."""
        c = self.config
        if not self.chunked_loss:
            return loss.unchunked_loss(self.logits(idx), targets, c.vocab_size)
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return loss.linear_cross_entropy(self.hidden(idx), self.head_weight(), targets, c.vocab_size)
        logits = self.logits(idx)
        return loss.vocab_parallel_loss(logits, targets, c.vocab_size, d_model=c.d_model)


# ---------------------------------------------------------------------------------------
# Layout-independent initialisation, drawn shard by shard, and the logical view of parameters


def _draw(out: torch.Tensor, name: str, c: ModelConfig, seed: int, shape: tuple, box: tuple, start: int) -> None:
    """Elements [start, start + out.numel()) (C order) of `box` of logical tensor `name`'s initial value."""
    init = params.rule(name).init
    if init == "zeros":
        out.zero_()
    elif init == "ones":
        out.fill_(1.0)
    else:
        rng.fill_range(out, "normal", seed, name, tuple((0, n) for n in shape), box, start, params.init_std(c, name))


def init_logical(name: str, shape: tuple[int, ...], c: ModelConfig, seed: int) -> torch.Tensor:
    """The whole initial value of logical tensor `name` (float32), a function of (seed, name) only."""
    out = torch.empty(shape, dtype=torch.float32)
    _draw(out.view(-1), name, c, seed, shape, tuple((0, n) for n in shape), 0)
    return out


@torch.no_grad()
def init_weights(model: GPT, seed: int) -> None:
    """Draw this rank's entries of every parameter: its TP slice, or under ZeRO-3 (parameters
    partitioned by deepspeed.zero.Init) its flat partition of that slice."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    shapes = params.logical_tensors(model.config)
    for name, p in model.named_parameters():
        shape = shapes[name]
        box = shard_box(shape, params.partition_dim(name), tp, rank)
        local = tuple(p.ds_shape) if hasattr(p, "ds_tensor") else tuple(p.shape)
        if rng.box_shape(box) != local:
            raise AssertionError(f"{name}: TP shard {local} is not {rng.box_shape(box)} of logical {shape} (megagrow.params)")
        if hasattr(p, "ds_tensor"):  # ZeRO-3: rank r of the partition group holds flat [r P, (r+1) P), zero-padded
            part = p.ds_tensor.view(-1)
            start = part.numel() * torch.distributed.get_rank(p.ds_process_group)
            n = max(0, min(part.numel(), p.ds_numel - start))
            _draw(part[:n], name, model.config, seed, shape, box, start)
            part[n:].zero_()
        else:
            _draw(p.view(-1), name, model.config, seed, shape, box, 0)


def build_model(c: ModelConfig, seed: int, dtype: torch.dtype = torch.float32) -> GPT:
    """A GPT with layout-independent initial weights (needs parallel_state initialised). Built
    inside deepspeed.zero.Init, its parameters are ZeRO-3 partitions and each is drawn as such."""
    model = GPT(c, dtype)
    init_weights(model, seed)
    return model


def partition_dim(name: str) -> int | None:
    """The TP split dim of logical tensor `name` (None: replicated), without building a model
    (megagrow.params' table, pinned to the attributes megatron's layers set)."""
    return params.partition_dim(name)
