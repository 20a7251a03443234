"""The tensor-parallel pieces the model is built from: megatron-core's Column/RowParallelLinear
made the way megagrow initialises and names them, the K/V all-gather of grouped-query attention
when TP exceeds the K/V heads, and the fused column GEMM (several ColumnParallelLinear layers on
one input as one GEMM, their parameters unchanged). Also the TP box/slice of a logical tensor."""

from __future__ import annotations

import torch
import torch.nn as nn
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import custom_bwd, custom_fwd  # megatron's autocast wrappers for its linear

from megagrow import collectives


def megatron_config(dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True,  # allocate on CPU; megagrow initialises the weights itself
        perform_initialization=False,
        params_dtype=dtype,
        gradient_accumulation_fusion=False,
    )


def no_init(_):
    pass


def sharded(layer: nn.Module, dim: int) -> nn.Module:
    """Mark layer.weight as split along `dim` over TP (megatron only does so when it initialises)."""
    tensor_parallel.set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)
    return layer


def column(cfg: ModelParallelConfig, d_in: int, d_out: int, bias: bool) -> nn.Module:
    layer = tensor_parallel.ColumnParallelLinear(d_in, d_out, config=cfg, init_method=no_init, bias=bias, gather_output=False)
    return sharded(layer, 0)


class _RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's RowParallelLinear, its own TP group handed to the linear function: its forward
    passes tp_group=None, which the function resolves to the same group after a warning on every call
    (under torch.compile, a graph break in each block)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


def row(cfg: ModelParallelConfig, d_in: int, d_out: int, bias: bool) -> nn.Module:
    layer = _RowParallelLinear(d_in, d_out, config=cfg, init_method=no_init, bias=bias, input_is_parallel=True, skip_bias_add=False)
    return sharded(layer, 1)


class GatherKV(torch.autograd.Function):
    """All-gather the TP ranks' K or V projection shards along the last dim (forward); the
    gradient of a rank's shard is the sum over ranks of the gathered gradient's slice
    (backward: all-reduce, then this rank's slice). megatron-core's own gather uses
    all_gather_into_tensor, which gloo lacks."""

    @staticmethod
    def forward(ctx, x):
        group = parallel_state.get_tensor_model_parallel_group()
        parts = collectives.all_gather(x.contiguous(), group=group)
        ctx.rank, ctx.size = torch.distributed.get_rank(group), x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        collectives.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
        return g[..., ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size].contiguous()


class _FusedColumn(torch.autograd.Function):
    """y = x @ cat(W_1..W_n).T (+ cat(b_1..b_n)) for n ColumnParallelLinear layers sharing the input x:
    megatron-core's LinearWithGradAccumulationAndAsyncCommunication (no sequence parallel, no gradient
    accumulation fusion), the layers' weights side by side: one GEMM forward, one for the input
    gradient (all-reduced over TP once, overlapping the weight-gradient GEMM, when allreduce is set:
    megatron's allreduce_dgrad) and one for the weight gradients. It saves x and the weights
    themselves, not their concatenation: backward concatenates them again, so no copy of the
    weights lives from forward to backward."""

    @staticmethod
    @custom_fwd
    def forward(ctx, x, allreduce: bool, n: int, *tensors):
        ws, bs = tensors[:n], tensors[n:]
        y = torch.matmul(x, torch.cat(ws).t())
        if bs:
            y = y + torch.cat(bs)
        ctx.save_for_backward(x, *ws)
        ctx.allreduce, ctx.bias, ctx.sizes = allreduce, bool(bs), [w.shape[0] for w in ws]
        return y

    @staticmethod
    @custom_bwd
    def backward(ctx, g):
        x, *ws = ctx.saved_tensors
        gx = g.matmul(torch.cat(ws))
        wait = None
        if ctx.allreduce:
            wait = collectives.all_reduce_async(gx, group=parallel_state.get_tensor_model_parallel_group())
        g2, x2 = g.contiguous().view(-1, g.shape[-1]), x.contiguous().view(-1, x.shape[-1])
        gws = g2.t().matmul(x2).split(ctx.sizes)
        gbs = g2.sum(dim=0).split(ctx.sizes) if ctx.bias else ()
        if wait is not None:
            gx = wait()
        return (gx, None, None, *gws, *gbs)


def fused_columns(layers: list, x: torch.Tensor) -> tuple:
    """The outputs of ColumnParallelLinear `layers` (same input size, gather_output off, bias not
    skipped) on the same input x, from one GEMM of their TP-local weights side by side; the
    parameters stay the layers' own. TP semantics as megatron-core's forward: the input goes
    through copy_to_tensor_model_parallel_region unless the layer all-reduces its input gradient
    itself (allreduce_dgrad: tp > 1), so the backward does one input-gradient all-reduce for all of
    them. A sequence-parallel layer runs as megatron runs it, layer by layer."""
    first = layers[0]
    if first.sequence_parallel:
        return tuple(layer(x)[0] for layer in layers)
    if not first.allreduce_dgrad:
        x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=first.tp_group)
    tensors = [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias is not None]
    y = _FusedColumn.apply(x, first.allreduce_dgrad, len(layers), *tensors)
    return y.split([layer.weight.shape[0] for layer in layers], dim=-1)


def shard_box(shape: tuple[int, ...], split: int | None, tp: int, rank: int) -> tuple:
    """This TP rank's box of a logical tensor of `shape` split along `split` (None: all of it)."""
    box = [(0, n) for n in shape]
    if split is not None and tp > 1:
        n = shape[split] // tp
        box[split] = (rank * n, (rank + 1) * n)
    return tuple(box)


def tp_slice(full: torch.Tensor, p: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of the logical tensor `full` (contiguous chunk along partition_dim)."""
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return full
    return full.chunk(tp, dim=p.partition_dim)[rank]
