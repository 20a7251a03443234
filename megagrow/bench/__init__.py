"""`megagrow bench`: throughput, TFLOP/s, MFU, overhead against plain PyTorch and transition cost
of one stage of a plan (`run`: the command; `loops`: the loops it times)."""

from megagrow.bench.loops import PlainLoop, single_process_stage
from megagrow.bench.run import main

__all__ = ["PlainLoop", "main", "single_process_stage"]
