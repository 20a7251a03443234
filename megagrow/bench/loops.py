"""The loops `megagrow bench` times: megagrow's own (a DeepSpeed engine built as the trainer
builds it) and the plain PyTorch reference (DDP + AdamW, same model, batches, schedule and
clipping), with the optional per-phase timer both share."""

from __future__ import annotations

import dataclasses
import time

import torch

from megagrow.config import Plan, Stage


def single_process_stage(plan: Plan, k: int, **layout_overrides) -> Plan:
    """The plan with stage k run at DP=1, TP=1, the whole global batch as one micro-batch."""
    st = plan.stages[k]
    L = st.layout
    lay = L.replace(tp=1, dp=1, micro_batch=L.global_batch, grad_accum=1, **layout_overrides)
    stages = list(plan.stages)
    stages[k] = dataclasses.replace(st, layout=lay)
    return dataclasses.replace(plan, stages=tuple(stages))


class PlainLoop:
    """The reference: the same model, AdamW, clipping, LR schedule and samples, no DeepSpeed.

    Needs megatron parallel_state initialised with tp=1 (any DP size; it runs on one rank).
    """

    def __init__(self, plan: Plan, k: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        from megagrow.data.batches import Batches
        from megagrow.model.gpt import build_model
        from megagrow.parallel.engine import param_groups
        from megagrow.schedule.lr import LRSchedule

        self.plan = single_process_stage(plan, k)
        self.stage = self.plan.stages[k]
        o = self.stage.optim
        self.device = torch.device(device)
        self.model = build_model(self.stage.model, plan.seed, dtype).to(self.device)
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.sched = LRSchedule.from_optim(o, self.stage.steps)
        self.batches = Batches.open(self.plan, self.stage, 0, 1)
        self.step_i = 0

    def step(self) -> float:
        from megagrow.data.batches import dropout_seed

        for g in self.opt.param_groups:
            g["lr"] = self.sched(self.step_i)
        first = self.step_i * self.stage.layout.global_batch
        x, y, g0 = self.batches.micro(first, 0, self.device)
        self.model.set_dropout_seed(dropout_seed(self.plan.seed, g0))
        loss = self.model(x, y)
        loss.backward()
        if self.stage.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.stage.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_i += 1
        return loss.item()


class SyntheticBatches:
    """Random token windows with the interface of the trainer's Batches (for --synthetic)."""

    def __init__(self, stage: Stage, dp_rank: int, dp_size: int, seed: int):
        self.stage, self.dp_rank, self.dp_size, self.seed = stage, dp_rank, dp_size, seed

    def micro(self, first_sample: int, micro_step: int, device):
        from megagrow.data import rank_slice

        L, m = self.stage.layout, self.stage.model
        lo, hi = rank_slice(L.global_batch, self.dp_size, self.dp_rank, L.micro_batch, L.grad_accum, micro_step)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + first_sample + lo)
        x = torch.randint(0, m.vocab_size, (hi - lo, m.seq_len + 1), generator=g).to(device)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous(), first_sample + lo


def stage_batches(plan: Plan, stage: Stage, dp_rank: int, dp_size: int, synthetic: bool):
    from megagrow.data.batches import Batches

    return SyntheticBatches(stage, dp_rank, dp_size, plan.seed) if synthetic else Batches.open(plan, stage, dp_rank, dp_size)


class PhaseTimer:
    """Per-phase wall time of the steps of one loop (device-synchronised at phase ends when on)."""

    def __init__(self, sync, on: bool):
        self.sync, self.on = sync, on
        self.phases: dict[str, float] = {}
        self.t = 0.0

    def start(self):
        if self.on:
            self.sync()
            self.t = time.perf_counter()

    def mark(self, name: str):
        if self.on:
            self.sync()
            now = time.perf_counter()
            self.phases[name] = self.phases.get(name, 0.0) + now - self.t
            self.t = now


class MegagrowLoop:
    """The trainer's own step (megagrow/train/step.py train_step) on a stage's engine, phases timed."""

    name = "megagrow"

    def __init__(self, plan: Plan, k: int, synthetic: bool, timer: PhaseTimer, overlap: bool | None = None):
        from megagrow.parallel.engine import build_stage as build
        from megagrow.parallel.groups import dp_rank_size
        from megagrow.schedule.lr import LRSchedule

        self.plan, self.stage = plan, plan.stages[k]
        self.engine, self.optimizer = build(plan, k, overlap=overlap)
        self.device = self.engine.device
        dp_rank, dp_size = dp_rank_size()
        self.batches = stage_batches(plan, self.stage, dp_rank, dp_size, synthetic)
        self.sched = LRSchedule.from_optim(self.stage.optim, self.stage.steps)
        self.i = 0
        self.timer = timer
        self.engine.train()

    def step(self) -> torch.Tensor:
        from megagrow.train.step import train_step

        L, tm = self.stage.layout, self.timer
        total = train_step(
            self.engine,
            self.optimizer,
            self.batches,
            self.plan.seed,
            L.grad_accum,
            self.i * L.global_batch,
            self.sched(self.i),
            self.device,
            phase=lambda name: tm.start() if name == "micro" else tm.mark(name),
        )
        self.i += 1
        return total / L.grad_accum

    def close(self):
        try:
            self.engine.destroy()
        except Exception:  # older engines: nothing to release beyond the references
            pass
        self.engine = self.optimizer = None


class PlainDDPLoop:
    """Plain PyTorch: the same model (with the stage's execution options) and samples, torch DDP over the
    DP group (dp > 1), AdamW (fused on CUDA), clip_grad_norm_; bf16 stages: fp32 weights + bf16 autocast on CUDA, bf16
    weights on CPU (megatron's layers have no CPU autocast)."""

    name = "plain"

    def __init__(self, plan: Plan, k: int, synthetic: bool, device, timer: PhaseTimer):
        from megatron.core import parallel_state as ps

        from megagrow.model.gpt import build_model
        from megagrow.parallel.engine import configure_model, param_groups
        from megagrow.parallel.groups import dp_rank_size
        from megagrow.schedule.lr import LRSchedule

        self.plan, self.stage = plan, plan.stages[k]
        L, o = self.stage.layout, self.stage.optim
        cuda = torch.device(device).type == "cuda"
        bf16 = L.dtype == "bf16"
        self.autocast = bf16 and cuda
        wdtype = torch.bfloat16 if (bf16 and not cuda) else torch.float32
        self.device = torch.device(device)
        model = build_model(self.stage.model, plan.seed, wdtype).to(self.device)
        configure_model(model, self.stage)  # the stage's recompute, fused GEMMs, chunked loss and compile, as the engine's
        dp_rank, dp_size = dp_rank_size()
        self.ddp = dp_size > 1
        if self.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, process_group=ps.get_data_parallel_group(), device_ids=[self.device.index] if cuda else None
            )
        self.model = model
        self.core = model.module if self.ddp else model
        kw = {"fused": True} if cuda else {}
        self.opt = torch.optim.AdamW(param_groups(self.core, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kw)
        self.batches = stage_batches(plan, self.stage, dp_rank, dp_size, synthetic)
        self.sched = LRSchedule.from_optim(o, self.stage.steps)
        self.i = 0
        self.timer = timer
        self.kind = (
            f"torch {'DDP + ' if self.ddp else ''}AdamW{' fused' if cuda else ''}, "
            f"{'fp32 weights + bf16 autocast' if self.autocast else ('bf16 weights' if wdtype == torch.bfloat16 else 'fp32')}"
        )

    def step(self) -> torch.Tensor:
        import contextlib

        from megagrow.data.batches import dropout_seed

        L, o, tm = self.stage.layout, self.stage.optim, self.timer
        for g in self.opt.param_groups:
            g["lr"] = self.sched(self.i)
        total = torch.zeros((), device=self.device)
        first = self.i * L.global_batch
        for j in range(L.grad_accum):
            tm.start()
            x, y, g0 = self.batches.micro(first, j, self.device)
            self.core.set_dropout_seed(dropout_seed(self.plan.seed, g0))
            tm.mark("data")
            last = j == L.grad_accum - 1
            ctx = self.model.no_sync() if (self.ddp and not last) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.model(x, y)
                tm.mark("forward")
                (loss / L.grad_accum).backward()
                tm.mark("backward")
            total += loss.detach().float()
        tm.start()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), o.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        tm.mark("step")
        self.i += 1
        return total / L.grad_accum

    def close(self):
        self.model = self.core = self.opt = None
