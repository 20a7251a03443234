"""In-process growth of a whole training state, and the TP=1 bridges to (model, AdamW).

    state = state_from_training(model, optimizer, sample_index=..., lr_position=...)
    state2 = grow(state, Width(2), seed=plan.seed, lr=LRPlacement(rewarmup=200))
    model2, opt2 = load_training(state2, optim_cfg)

What moves with an operator, besides the tensors (megagrow.growth.maps / ops):
- Adam `step`: kept (resetting it with non-zero moments would inflate the bias-corrected
  updates; the new tensors whose moments are zero take Adam's ordinary first-update size).
- LR schedule: the grown stage reads the schedule from position `lr_offset` (the big model's
  equivalent step R) with a linear re-warmup of `rewarmup` steps from `rewarmup_from` up
  to the schedule value at R + rewarmup (LRSchedule's offset/rewarmup/rewarmup_from), with
  peak `peak_lr` (the config's, or Kaplan's formula).
- data position: `sample_index` is carried over unchanged, never restarted.
- RNG: megagrow's dropout masks are a pure function of (plan seed, global sample index)
  (megagrow.train.dropout_seed), and the growth noise of (seed, key, index); carrying the
  data position is therefore all the RNG state there is to carry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.maps import apply_map
from megagrow.growth.ops import GrowthPlan, Identity, Operator, kaplan_peak_lr, logical_tensors, plan_growth


@dataclass
class GrowthState:
    """The whole single-process training state growth reads and writes (logical tensors)."""

    config: ModelConfig
    params: dict  # {name: fp32 tensor}
    exp_avg: dict
    exp_avg_sq: dict
    step: int = 0  # Adam's step count (bias correction); kept across growth
    sample_index: int = 0  # global data position (next sample); carried over
    lr_position: int = 0  # schedule position the next step would read (offset + stage step)
    lr_offset: int = 0  # schedule position of the current stage's step 0
    rewarmup: int = 0
    rewarmup_from: float = 0.0
    peak_lr: float | None = None
    history: list = field(default_factory=list)

    def check(self) -> None:
        want = logical_tensors(self.config)
        for what in ("params", "exp_avg", "exp_avg_sq"):
            d = getattr(self, what)
            if set(d) != set(want):
                raise UserError(f"state {what} names do not match the model config: {sorted(set(d) ^ set(want))[:6]}")
            for n, s in want.items():
                if tuple(d[n].shape) != tuple(s):
                    raise UserError(f"state {what}[{n}] has shape {tuple(d[n].shape)}, the config says {tuple(s)}")

    def schedule(self, optim, decay_steps: int):
        """The LRSchedule the next stage runs (`decay_steps`: absolute schedule position of min_lr)."""
        from megagrow.schedule.lr import LRSchedule

        o = optim if self.peak_lr is None else optim.replace(lr=self.peak_lr, min_lr=min(optim.min_lr, self.peak_lr))
        return LRSchedule.from_optim(o.replace(decay_steps=decay_steps), 0, self.lr_offset, self.rewarmup, self.rewarmup_from)


def placed_position(op: Operator, pos: int, how: str) -> int | None:
    """The LR-schedule position the model grown by `op` enters at, from the source's position `pos`:
    "keep" keeps it, "restart" starts again at 0, "paper" takes the big model's equivalent step
    floor(pos / c), c the operator's paper constant S_small / S_big (1.776 width x2, 1.412 depth x2),
    or None for an operator the paper gives no constant for; "auto" (the default) is "restart" after
    width growth and "paper" after any other (the savings experiment: a width-grown model learns at
    ~2/3 of the from-scratch speed, and restarting its schedule lowered the final loss by 0.037
    [0.018, 0.055] over two seeds, docs/growth.md). The one place of this arithmetic:
    LRPlacement.resolve (in process) and megagrow.state.executor.lr_placement (transitions) call it."""
    if how == "auto":
        how = "restart" if getattr(op, "name", "") == "width" else "paper"
    if how == "keep":
        return pos
    if how == "restart":
        return 0
    if how != "paper":
        raise UserError(f"LR placement must be auto, paper, keep or restart, got {how!r}")
    c = getattr(op, "paper_c", None)
    return int(math.floor(pos / c)) if c else None


@dataclass(frozen=True)
class LRPlacement:
    """Where the grown model enters the LR schedule.

    peak_lr: a number, or "kaplan" (0.003239 - 0.0001395 log10(12 L d^2) of the new model),
        or None to keep the state's.
    equivalent_step: an int (the big model's equivalent step R, e.g. from the planner's
        S_eff), "paper" (lr_position / c, c = 1.776 width x2, 1.412 depth x2) or "keep".
    rewarmup / rewarmup_from: linear re-warmup length (150-200 in the paper) and start LR.
    """

    peak_lr: float | str | None = None
    equivalent_step: int | str = "keep"
    rewarmup: int = 200
    rewarmup_from: float = 0.0

    def resolve(self, state: GrowthState, op: Operator, new: ModelConfig) -> tuple[float | None, int]:
        if self.peak_lr == "kaplan":
            peak = kaplan_peak_lr(new)
        elif self.peak_lr is None or isinstance(self.peak_lr, (int, float)):
            peak = state.peak_lr if self.peak_lr is None else float(self.peak_lr)
        else:
            raise UserError(f"peak_lr must be a number, 'kaplan' or None, got {self.peak_lr!r}")
        R = self.equivalent_step
        if R == "keep":
            R = state.lr_position
        elif R == "paper":
            R = placed_position(op, state.lr_position, "paper")
            if R is None:
                raise UserError(f"the paper gives no equivalent-step constant for {op.name} growth {op.describe()}; pass the step")
        elif isinstance(R, bool) or not isinstance(R, int) or R < 0:
            raise UserError(f"equivalent_step must be a non-negative int, 'paper' or 'keep', got {R!r}")
        if isinstance(self.rewarmup, bool) or not isinstance(self.rewarmup, int) or self.rewarmup < 0:
            raise UserError(f"rewarmup must be a non-negative int, got {self.rewarmup!r}")
        return peak, int(R)


def apply_plan(gp: GrowthPlan, params: dict, exp_avg: dict, exp_avg_sq: dict, seed: int) -> tuple[dict, dict, dict]:
    """The declarative map applied to weights and both moments."""
    return (
        apply_map(gp.tensors, params, "w", seed),
        apply_map(gp.tensors, exp_avg, "m", seed),
        apply_map(gp.tensors, exp_avg_sq, "v", seed),
    )


def grow(state: GrowthState, op: Operator, seed: int = 0, lr: LRPlacement | None = None, target: ModelConfig | None = None) -> GrowthState:
    """The training state after growth `op` (in process, logical tensors).

    `seed` keys the growth noise (symmetry breaking, fresh rows): pass the plan seed.
    `lr` places the grown model on the LR schedule (default LRPlacement(): same position,
    same peak, 200-step re-warmup from 0; for Identity with lr=None the schedule fields are
    kept as they are). `target`: the config the result must have (e.g. the plan's next
    stage), else UserError."""
    state.check()
    gp = plan_growth(op, state.config, target)
    p, m, v = apply_plan(gp, state.params, state.exp_avg, state.exp_avg_sq, seed)
    record = {"op": op.describe(), "at_sample": state.sample_index, "adam_step": state.step, "lr_position_before": state.lr_position}
    if lr is None and isinstance(op, Identity):  # pure resharding: the schedule goes on untouched
        return dataclasses.replace(state, params=p, exp_avg=m, exp_avg_sq=v, history=state.history + [record])
    lr = lr or LRPlacement()
    peak, R = lr.resolve(state, op, gp.new)
    return GrowthState(
        config=gp.new,
        params=p,
        exp_avg=m,
        exp_avg_sq=v,
        step=state.step,
        sample_index=state.sample_index,
        lr_position=R,
        lr_offset=R,
        rewarmup=lr.rewarmup,
        rewarmup_from=lr.rewarmup_from,
        peak_lr=peak,
        history=state.history + [{**record, "equivalent_step": R, "rewarmup": lr.rewarmup}],
    )


# ---------------------------------------------------------------------------------------
# TP=1 bridges to a torch model + torch.optim.AdamW


def state_from_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    sample_index: int = 0,
    lr_position: int = 0,
    lr_offset: int = 0,
    peak_lr: float | None = None,
) -> GrowthState:
    """Read a (model, AdamW) pair at TP=1 into a GrowthState (copies, fp32)."""
    cfg = model.config
    params, m, v, steps = {}, {}, {}, set()
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False) and torch.distributed.is_initialized():
            from megatron.core import parallel_state

            if parallel_state.get_tensor_model_parallel_world_size() != 1:
                raise UserError("state_from_training reads TP=1 models only; use the shard-to-shard executor")
        params[name] = p.detach().float().clone()
        st = optimizer.state.get(p, {}) if optimizer is not None else {}
        if "exp_avg" in st:
            m[name] = st["exp_avg"].detach().float().clone()
            v[name] = st["exp_avg_sq"].detach().float().clone()
            steps.add(int(st["step"]))
        else:
            m[name] = torch.zeros_like(params[name])
            v[name] = torch.zeros_like(params[name])
            steps.add(0)
    if len(steps) > 1:
        raise UserError(f"optimizer parameters are at different steps {sorted(steps)}; growth needs one step count")
    s = GrowthState(
        cfg,
        params,
        m,
        v,
        step=steps.pop() if steps else 0,
        sample_index=sample_index,
        lr_position=lr_position,
        lr_offset=lr_offset,
        peak_lr=peak_lr,
    )
    s.check()
    return s


def load_training(state: GrowthState, optim=None, seed: int = 0, lr: float | None = None):
    """A new model + torch.optim.AdamW holding `state` (TP=1). `optim`: an OptimConfig (betas,
    eps, weight decay; megagrow's param groups) or None for torch defaults."""
    from megagrow.model.gpt import build_model
    from megagrow.parallel.engine import param_groups

    state.check()
    model = build_model(state.config, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state.params[name])
    lr0 = lr if lr is not None else (state.peak_lr or (optim.lr if optim is not None else 1e-3))
    if optim is not None:
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=lr0, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr0)
    if state.step > 0:
        for name, p in model.named_parameters():
            opt.state[p] = {
                "step": torch.tensor(float(state.step)),
                "exp_avg": state.exp_avg[name].clone(),
                "exp_avg_sq": state.exp_avg_sq[name].clone(),
            }
    return model, opt
