"""What the stage loop measures, in one place: the FLOP ledger and throughput fields of each
training record, the eval loss at its moments, TensorBoard events.

Log schema (RUN/<stage>/log.jsonl; readers rely on these names):
- a training record gains `tokens` and `flops` (cumulative over the whole run, earlier stages
  included, on megagrow/metrics/flops.py's convention), `tflops_per_device`, `mfu` (null when the
  device peak is unknown, e.g. on CPU) and `peak_mem_gb`;
- an eval record is a line of its own, without "loss":
  {"stage", "step", "eval_loss", "tokens", "flops", "at", "time"}, `at` one of "periodic"
  (every `eval_every` steps), "stage_end", "before_growth" and "after_growth" (written by the
  grown stage at its step 0: the previous stage's final eval loss, then the grown model's).
"""

from __future__ import annotations

import time

import torch

from megagrow.config import Plan
from megagrow.metrics.flops import Ledger, peak_memory_gb, peak_tflops, throughput


class StageMeter:
    def __init__(self, plan: Plan, k: int, tokens0: int, flops0: int, device, rank: int, log_dir: str | None, quiet: bool = False):
        from megagrow.data.evalset import EvalSet
        from megagrow.parallel.groups import dp_rank_size

        self.plan, self.k, self.stage = plan, k, plan.stages[k]
        self.device, self.rank, self.quiet = device, rank, quiet
        self.ledger = Ledger.of(self.stage, tokens0, flops0)
        self.world = torch.distributed.get_world_size()
        self.peak = peak_tflops(device, self.stage.layout.dtype)
        m = self.stage.model
        self.evalset, why = EvalSet.open(plan.data.prefix, m.seq_len, self.stage.eval_tokens, m.vocab_size)
        if self.evalset is None:
            self.say(f"[megagrow] {self.stage.name}: eval off ({why})")
        self.dp_rank, self.dp_size = dp_rank_size()
        self.eval_seconds = 0.0  # time spent in evals, kept out of the training throughput
        self.tb = None
        if log_dir is not None and rank == 0:
            from megagrow.metrics.tb import TBWriter

            self.tb = TBWriter(log_dir, say=self.say)

    def say(self, msg: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(msg, flush=True)

    # ---- training records ----------------------------------------------------------------
    def train_fields(self, step: int, step_time_s: float) -> dict:
        return {
            "tokens": self.ledger.tokens(step),
            "flops": self.ledger.flops(step),
            **{k: v for k, v in throughput(self.stage, step_time_s, self.world, self.peak).items() if k != "tokens_per_s"},
            "peak_mem_gb": peak_memory_gb(self.device),
        }

    # ---- evals ----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.evalset is not None

    def periodic_due(self, step: int, finished: bool) -> bool:
        e = self.stage.eval_every
        return self.enabled and e > 0 and step % e == 0 and not finished  # the stage end has its own eval

    def evaluate(self, engine) -> float:
        """The eval loss now (every rank calls it; the same value on every rank)."""
        from megatron.core import parallel_state as ps

        from megagrow.metrics.evaluate import evaluate

        t0 = time.perf_counter()
        v = evaluate(
            engine, self.evalset, self.dp_rank, self.dp_size, ps.get_data_parallel_group(), self.stage.layout.micro_batch, self.device
        )
        self.eval_seconds += time.perf_counter() - t0
        return v

    def eval_record(self, step: int, value: float, at: str) -> dict:
        return {
            "stage": self.stage.name,
            "step": step,
            "eval_loss": value,
            "tokens": self.ledger.tokens(step),
            "flops": self.ledger.flops(step),
            "at": at,
            "time": time.time(),
        }

    def comparable_before(self) -> bool:
        """The previous stage's final eval read the same window list as this stage's evals."""
        from megagrow.data.evalset import EvalSet

        prev = self.plan.stages[self.k - 1]
        es, _ = EvalSet.open(self.plan.data.prefix, prev.model.seq_len, prev.eval_tokens, prev.model.vocab_size)
        return es is not None and self.evalset is not None and es.key == self.evalset.key

    # ---- output ---------------------------------------------------------------------------
    def write(self, rec: dict) -> None:
        if self.tb is not None:
            self.tb.write(rec)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
