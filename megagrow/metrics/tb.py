"""TensorBoard event files beside log.jsonl (rank 0): RUN/<stage>/events.out.tfevents.*

`tensorboard --logdir RUN` shows each stage as a run; the x axis (TensorBoard's step) is the
cumulative training tokens of the whole run, so the stages of a staged run continue one another
and line up with a baseline run of the same token budget. Scalars: train/loss, train/lr,
train/grad_norm, perf/tokens_per_s, perf/tflops_per_device, perf/mfu, perf/peak_mem_gb,
eval/loss, ledger/flops. Without the tensorboard package nothing is written (said once).
"""

from __future__ import annotations

_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_device": "perf/tflops_per_device",
    "mfu": "perf/mfu",
    "peak_mem_gb": "perf/peak_mem_gb",
    "eval_loss": "eval/loss",
    "flops": "ledger/flops",
}


class TBWriter:
    def __init__(self, logdir: str, active: bool = True, say=print):
        self.w = None
        if not active:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional dependency
            say("[megagrow] tensorboard is not installed: no TensorBoard events (log.jsonl has everything)")
            return
        self.w = SummaryWriter(log_dir=logdir, flush_secs=30)

    def write(self, rec: dict) -> None:
        if self.w is None or rec.get("tokens") is None:
            return
        step = int(rec["tokens"])
        for key, tag in _SCALARS.items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.w.add_scalar(tag, float(v), step, walltime=rec.get("time"))

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w = None
