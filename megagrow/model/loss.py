"""The training and eval loss: mean next-token cross entropy over the real vocabulary.

The token embedding and the LM head have ModelConfig.padded_vocab rows (a multiple of 128); the
rows past vocab_size are no tokens, so their logits are masked to -inf: they never take
probability. (An imported model's padding rows are zero, their logits 0: left in the softmax they
would take most of it whenever the real logits are negative.)

Neither path keeps fp32 logits of the whole micro-batch:

  tp = 1   `linear_cross_entropy`: the logits are made chunk by chunk over the tokens, from the
           final hidden states and the head's weight, and each chunk's gradients are computed as
           soon as its softmax is known (the loss is a scalar, so backward only scales them): one
           chunk of logits exists at a time, and the head's three GEMMs run once, as without chunks.
  tp > 1   `vocab_parallel_loss`: megatron-core's vocab_parallel_cross_entropy on this rank's
           vocabulary shard, padded columns masked, one chunk of tokens at a time under activation
           checkpointing. That function upcasts its input to fp32 and keeps the fp32 softmax for
           backward; chunked and recomputed, only one chunk's fp32 copy exists at a time (the
           logits themselves stay in the training dtype).

A chunk holds about as many logits as the micro-batch's hidden states hold numbers (tokens x
d_model), so the loss never needs much more memory than one layer's activations.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state, tensor_parallel


def chunk_tokens(n_tokens: int, d_model: int, vocab: int) -> int:
    """Tokens per chunk: a chunk's logits (chunk x vocab) about the size of the hidden states (n_tokens x d_model)."""
    return max(1, min(n_tokens, n_tokens * d_model // vocab))


def _chunk_logits(x: torch.Tensor, w: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits (n, V_padded) of hidden states x (n, d), the padded columns -inf."""
    z = (x @ w.t()).float()
    z[:, vocab_size:] = float("-inf")
    return z


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of the cross entropy of logits x @ w.T against targets, chunk by chunk,
    with the gradients made in the forward pass (backward scales them by the incoming gradient)."""

    @staticmethod
    def forward(ctx, x, w, targets, vocab_size: int, chunk: int, scale: float):
        gx = torch.empty_like(x)
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # summed over chunks in fp32
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xs, ts = x[s : s + chunk], targets[s : s + chunk]
            z = _chunk_logits(xs, w, vocab_size)
            lse = torch.logsumexp(z, dim=1)
            total += (lse - z.gather(1, ts[:, None]).squeeze(1)).sum()
            g = z.sub_(lse[:, None]).exp_()  # softmax, in place
            g[torch.arange(len(ts), device=g.device), ts] -= 1.0
            g = g.mul_(scale).to(w.dtype)  # d(scale * loss sum) / d logits
            gx[s : s + chunk] = g @ w
            gw += g.t() @ xs
        ctx.save_for_backward(gx, gw.to(w.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        return gx * grad.to(gx.dtype), gw * grad.to(gw.dtype), None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross entropy of the logits x @ w.T (x: (..., d) hidden states, w: (V_padded, d) the
    head) against targets (...), rows of w past vocab_size left out of the softmax; never more than
    one chunk of logits at a time (tp = 1)."""
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    n = x.shape[0]
    chunk = chunk or chunk_tokens(n, x.shape[1], w.shape[0])
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _LinearCrossEntropy.apply(x, w, targets, vocab_size, chunk, 1.0 / n)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):
        z, ts = _chunk_logits(x[s : s + chunk], w, vocab_size), targets[s : s + chunk]
        total += (torch.logsumexp(z, dim=1) - z.gather(1, ts[:, None]).squeeze(1)).sum()
    return total / n


def _masked_vocab_parallel_ce(logits: torch.Tensor, targets: torch.Tensor, real: int) -> torch.Tensor:
    """Loss sum of one chunk: megatron-core's vocab-parallel cross entropy, this rank's columns
    from `real` on (padding) at -inf. The fp32 copy is new (megatron writes into its input)."""
    z = logits.to(torch.float32, copy=True)
    z[:, real:] = float("-inf")
    return tensor_parallel.vocab_parallel_cross_entropy(z, targets).sum()


def vocab_parallel_loss(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int | None = None, d_model: int | None = None
) -> torch.Tensor:
    """Mean cross entropy of vocab-parallel logits (..., V_padded / tp) against targets (...), the
    padded columns of each rank's shard masked, one chunk of tokens in fp32 at a time (tp > 1)."""
    local = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local  # this shard's first vocabulary id
    real = max(0, min(local, vocab_size - first))
    logits, targets = logits.reshape(-1, local), targets.reshape(-1)
    n = logits.shape[0]
    chunk = chunk or chunk_tokens(n, d_model or local, local)
    grad = torch.is_grad_enabled() and logits.requires_grad
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for s in range(0, n, chunk):
        args = (logits[s : s + chunk], targets[s : s + chunk], real)
        if grad:  # keep nothing of the chunk's fp32 softmax: recompute it in backward
            total = total + torch.utils.checkpoint.checkpoint(_masked_vocab_parallel_ce, *args, use_reentrant=False)
        else:
            total += _masked_vocab_parallel_ce(*args)
    return total / n


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The plain form (tp = 1, for tests): fp32 logits of the whole batch, real vocabulary only."""
    z = logits[..., :vocab_size].float()
    return torch.nn.functional.cross_entropy(z.reshape(-1, vocab_size), targets.reshape(-1))


def unchunked_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross entropy of (vocab-parallel at tp > 1) logits of the whole batch in one piece, padded
    columns masked, fp32 softmax of every token kept for backward: the form the chunked paths above
    replace (Stage.chunked_loss false, to measure what chunking costs or saves)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return reference_loss(logits, targets, vocab_size)
    local = logits.shape[-1]
    real = max(0, min(local, vocab_size - parallel_state.get_tensor_model_parallel_rank() * local))
    return _masked_vocab_parallel_ce(logits.reshape(-1, local), targets.reshape(-1), real) / targets.numel()
