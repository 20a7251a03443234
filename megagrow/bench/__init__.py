"""`megagrow bench`: throughput, TFLOP/s, MFU, overhead against plain PyTorch, each MFU option on/off and
transition cost of one stage of a plan (`run`: the command, its sweeps and table; `rows`: one timed row;
`loops`: the loops it times; `transition`: the transition benchmark). The benchmark library: the scripts
under the top-level bench/ call it (or the trainer) and time no steps of their own."""

from megagrow.bench.loops import PlainLoop, single_process_stage
from megagrow.bench.run import main

__all__ = ["PlainLoop", "main", "single_process_stage"]
