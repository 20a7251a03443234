"""The eval loss: mean next-token loss of the model over the fixed held-out window list.

Every rank of the stage calls `evaluate` at the same step. It reads only the validation split
(never the training stream), runs the model in eval mode (dropout off) without gradients and
leaves the model's training flag as it found it; nothing a resumed run depends on (data
position, dropout seeds, optimizer, RNGs) moves. The loss sums of the DP ranks are added in
float64 over the data-parallel group (TP ranks hold the same values).
"""

from __future__ import annotations

import torch

from megagrow import collectives
from megagrow.data.evalset import EvalSet


@torch.no_grad()
def evaluate(engine, evalset: EvalSet, dp_rank: int, dp_size: int, dp_group, batch: int, device) -> float:
    module = engine.module
    was_training = module.training
    module.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    try:
        for ids, counted in evalset.rounds(dp_rank, dp_size, batch):
            x = torch.from_numpy(evalset.windows(ids)).to(device)
            loss = engine(x[:, :-1].contiguous(), x[:, 1:].contiguous())  # mean over the batch's targets
            if counted:
                n = x.shape[0] * (x.shape[1] - 1)
                sums[0] += loss.double() * n
                sums[1] += n
    finally:
        module.train(was_training)
    if dp_size > 1:
        collectives.all_reduce(sums, group=dp_group)
    total, count = sums.tolist()
    return total / count
