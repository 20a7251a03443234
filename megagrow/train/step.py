"""The training step, once: the trainer (megagrow/train/loop.py) runs it, and `megagrow bench`
(megagrow/bench/) times it, so what it measures is what trains."""

from __future__ import annotations

from collections.abc import Callable

import torch


def train_step(
    engine, optimizer, batches, seed: int, grad_accum: int, first_sample: int, lr: float, device, phase: Callable[[str], None] | None = None
) -> torch.Tensor:
    """One optimizer step of a DeepSpeed engine at learning rate `lr`: for each of the `grad_accum`
    micro-batches of the global batch that starts at sample `first_sample` (this rank's slice of it),
    the dropout seed of its first sample, forward, backward and engine.step (DeepSpeed steps the
    optimizer at the last one). Returns this rank's loss summed over its micro-batches (a 0-d fp32
    tensor on `device`; nothing is synchronised). phase(name), if given, is called at the start of each
    micro-batch ("micro") and after its "data", "forward", "backward" and "step" (a benchmark's timer)."""
    from megagrow.data.batches import dropout_seed
    from megagrow.parallel.engine import set_lr

    mark = phase or (lambda name: None)
    set_lr(optimizer, lr)
    total = torch.zeros((), device=device)
    for j in range(grad_accum):
        mark("micro")
        x, y, g0 = batches.micro(first_sample, j, device)
        engine.module.set_dropout_seed(dropout_seed(seed, g0))
        mark("data")
        loss = engine(x, y)
        mark("forward")
        engine.backward(loss)
        mark("backward")
        engine.step()
        mark("step")
        total += loss.detach().float()
    return total
