"""One stage's configs: the parallel layout (Layout), the optimizer (OptimConfig), when it stops
(StopRule), how growth into it treats what it carries over (GrowthOptions), eval, activation
recomputation and compile options (Stage), and the layout advice load_plan prints (stage_warnings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megagrow.config.base import _Config, _is_int, _need
from megagrow.config.model import VOCAB_MULTIPLE, ModelConfig

DTYPES = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
RECOMPUTE = ("none", "attention", "mlp", "full")  # Stage.activation_checkpointing: what backward recomputes
COMPILE = ("auto", "on", "off")  # Stage.compile: torch.compile each transformer block (auto: on CUDA, off on CPU)


def recompute_mode(v: Any) -> Any:
    """Stage.activation_checkpointing's canonical value: true/false (plans written when it was a
    boolean) are full/none; anything else is returned as given (validate() checks it)."""
    return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v


@dataclass(frozen=True)
class Layout(_Config):
    """How one stage runs: tensor parallel x data parallel, ZeRO stage, batch shape, precision."""

    tp: int = 1
    dp: int = 1
    zero_stage: int = 2
    micro_batch: int = 4
    grad_accum: int = 1
    dtype: str = "fp32"
    ds_config: str | None = None  # extra DeepSpeed JSON (engine tuning), e.g. ds_configs/zero3.json

    def validate(self, where: str = "layout") -> None:
        for k in ("tp", "dp", "micro_batch", "grad_accum"):
            v = getattr(self, k)
            _need(_is_int(v) and v > 0, where, f"{k} must be a positive integer, got {v!r}")
        _need(self.zero_stage in (0, 1, 2, 3), where, f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _need(self.dtype in DTYPES, where, f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.dp

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch * self.grad_accum

    def check_model(self, model: ModelConfig, where: str = "layout") -> None:
        """Cross-checks between a layout and the model it runs."""
        _need(model.n_heads % self.tp == 0, where, f"n_heads {model.n_heads} is not divisible by tp {self.tp}")
        kv = model.kv_heads  # split over TP ranks, or (tp > kv) each rank computes its group's K/V as Megatron does
        _need(
            kv % self.tp == 0 or (self.tp % kv == 0 and model.kv_dim % self.tp == 0),
            where,
            f"n_kv_heads {kv} and tp {self.tp}: tp must divide n_kv_heads, or be a multiple of it that divides "
            f"n_kv_heads x head_dim = {model.kv_dim}",
        )
        _need(model.ffn_dim % self.tp == 0, where, f"d_ff {model.ffn_dim} is not divisible by tp {self.tp}")
        _need(VOCAB_MULTIPLE % self.tp == 0, where, f"tp {self.tp} must divide {VOCAB_MULTIPLE} (vocab padding)")

    def check_world(self, world_size: int, where: str = "layout") -> None:
        _need(world_size == self.world_size, where, f"world size {world_size} != tp {self.tp} x dp {self.dp} = {self.world_size}")


@dataclass(frozen=True)
class OptimConfig(_Config):
    """AdamW with decoupled weight decay, global-norm clipping and a warmup + decay schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    decay_steps: int | None = None  # schedule position of min_lr; default: where the stage ends (offset + steps)
    rewarmup_steps: int = 0  # after growth: linear ramp from 0 to the schedule over this many steps
    # after growth, where the grown stage sits on its schedule: "paper" = the source's position / c
    # (c = 1.776 width, 1.412 depth: the big model's equivalent step), "keep" = the source's position,
    # "restart" = 0 (a fresh schedule, warmup included); "auto" = restart after width growth, paper after
    # any other (width-grown models learn faster with a restarted schedule: docs/growth.md)
    lr_placement: str = "auto"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def validate(self, where: str = "optim") -> None:
        _need(self.lr > 0 and self.min_lr >= 0 and self.min_lr <= self.lr, where, "need 0 <= min_lr <= lr and lr > 0")
        _need(_is_int(self.warmup_steps) and self.warmup_steps >= 0, where, "warmup_steps must be >= 0")
        _need(_is_int(self.rewarmup_steps) and self.rewarmup_steps >= 0, where, "rewarmup_steps must be >= 0")
        _need(
            self.lr_placement in ("auto", "paper", "keep", "restart"),
            where,
            f"lr_placement must be auto, paper, keep or restart, got {self.lr_placement!r}",
        )
        _need(self.schedule in LR_SCHEDULES, where, f"schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        _need(self.decay_steps is None or (_is_int(self.decay_steps) and self.decay_steps > 0), where, "decay_steps must be positive")
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, where, "betas must be in [0, 1)")
        _need(self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0, where, "eps > 0, weight_decay >= 0, grad_clip >= 0")


STOP_RULES = ("steps", "slope")


@dataclass(frozen=True)
class StopRule(_Config):
    """When a stage ends. "steps": after `steps` (the default). "slope": the practical rule of
    Shen et al. (2022) - end the stage early once the smoothed slope d log10 L / d log10 C of the
    validation loss (the logged training loss when the stage has no eval set) rises above
    `threshold` (megagrow.schedule.slope.SlopeRule: points more than `spike_tol` above the running
    minimum dropped, the slope of the last `window` kept points by `estimator` - Theil-Sen median
    or least squares -, optional EMA, `patience` points in a row), not before `min_steps`;
    `steps` stays the upper bound. threshold None: the paper's value for the next
    stage's operator (width -0.0475, depth -0.0575), or the stop value -0.052 for the last stage.
    C = 6 N (non-embedding) x tokens at the model's schedule position: a grown model counts from
    its equivalent step (megagrow/schedule/stop.py)."""

    rule: str = "steps"
    threshold: float | None = None
    min_steps: int = 0
    window: int = 10
    ema: float = 0.0
    patience: int = 1
    spike_tol: float | None = 0.01  # drop points > 1% above the running minimum (None: keep all)
    estimator: str = "theil-sen"  # or "lsq"

    def validate(self, where: str = "stop") -> None:
        _need(self.rule in STOP_RULES, where, f"rule must be one of {STOP_RULES}, got {self.rule!r}")
        _need(
            self.threshold is None or (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)),
            where,
            f"threshold must be a number, got {self.threshold!r}",
        )
        _need(_is_int(self.min_steps) and self.min_steps >= 0, where, f"min_steps must be >= 0, got {self.min_steps!r}")
        _need(_is_int(self.window) and self.window >= 2, where, f"window must be an integer >= 2, got {self.window!r}")
        _need(isinstance(self.ema, (int, float)) and 0.0 <= self.ema < 1.0, where, f"ema must be in [0, 1), got {self.ema!r}")
        _need(_is_int(self.patience) and self.patience >= 1, where, f"patience must be an integer >= 1, got {self.patience!r}")
        _need(
            self.spike_tol is None
            or (isinstance(self.spike_tol, (int, float)) and not isinstance(self.spike_tol, bool) and 0.0 <= self.spike_tol < float("inf")),
            where,
            f"spike_tol must be a number >= 0 or null (filter off), got {self.spike_tol!r}",
        )
        _need(self.estimator in ("theil-sen", "lsq"), where, f"estimator must be theil-sen or lsq, got {self.estimator!r}")


OPTIMIZER_STATE = ("moved", "reset")


@dataclass(frozen=True)
class GrowthOptions(_Config):
    """How the growth into this stage treats what it carries over (the ablation knobs).

    symmetry_breaking: width growth's loss-preserving noise, in units of init_std (0 = the
    copies stay identical, the reference code's behaviour); optimizer_state: "moved" (the Adam
    moments are grown with the weights and the step kept, megagrow's default) or "reset" (zero
    moments and step 0: a fresh optimizer on the grown weights)."""

    symmetry_breaking: float = 1.0
    optimizer_state: str = "moved"

    def validate(self, where: str = "growth") -> None:
        _need(self.symmetry_breaking >= 0, where, f"symmetry_breaking must be >= 0, got {self.symmetry_breaking!r}")
        _need(
            self.optimizer_state in OPTIMIZER_STATE,
            where,
            f"optimizer_state must be one of {', '.join(OPTIMIZER_STATE)}, got {self.optimizer_state!r}",
        )


@dataclass(frozen=True)
class Stage(_Config):
    """One stage of a plan: a model, the layout it runs at, how long, and how it is logged/saved."""

    name: str = "stage"
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: Layout = field(default_factory=Layout)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 100
    save_every: int = 50
    log_every: int = 10
    grow: str | None = None  # growth operator that produced this stage from the previous one
    growth: GrowthOptions = field(default_factory=GrowthOptions)  # symmetry breaking, optimizer state moved/reset
    stop: StopRule = field(default_factory=StopRule)  # end at `steps`, or earlier by the slope rule
    # eval loss on the held-out split (PREFIX.valid): every `eval_every` steps (0: only at the stage
    # end and around growth), over `eval_tokens` held-out tokens (0: no eval at all)
    eval_every: int = 0
    eval_tokens: int = 65536
    # what each block recomputes in the backward pass instead of keeping its activations: "none", "attention"
    # (the norm + attention sublayer), "mlp" (the norm + MLP sublayer) or "full" (the whole block: least memory,
    # ~1/3 more compute; needs dropout 0). true / false (plans from when this was a boolean) read as full / none.
    activation_checkpointing: Any = "none"
    # Q, K, V (and llama's gate, up) projections each as one GEMM over the separate q/k/v parameters, one
    # input-gradient all-reduce under TP instead of three; the parameters, checkpoints and growth are unchanged
    fused_qkv: bool = True
    # torch.compile each transformer block before DeepSpeed takes the model: auto (on when the device is CUDA,
    # off on CPU), on, off. YAML's on / off (read as true / false) mean on / off. Not at ZeRO-3 (its parameter hooks)
    compile: Any = "auto"
    # the loss chunk by chunk over the tokens (no fp32 logits of the whole batch, megagrow/model/loss.py); false:
    # the whole batch's logits at once (to measure the difference)
    chunked_loss: bool = True
    # first stage only: start from a transformers model directory on disk ("hf:PATH") or a Megatron-LM checkpoint
    # ("megatron:PATH"): its weights, fresh optimizer state, at this stage's layout (megagrow.interop)
    init_from: str | None = None
    # a hint, for advice only: the memory of one device in GB (e.g. 80). With it, a stage at tp > 1 whose
    # training state fits half of one device gets a warning (plan_warnings); without it that check is skipped
    device_memory_gb: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "activation_checkpointing", recompute_mode(self.activation_checkpointing))
        if isinstance(self.compile, bool):  # YAML 1.1 reads `compile: on` / `off` as true / false
            object.__setattr__(self, "compile", "on" if self.compile else "off")

    def validate(self, where: str = "stage") -> None:
        _need(
            isinstance(self.name, str) and self.name.replace("_", "").replace("-", "").isalnum(),
            where,
            f"name must be alphanumeric (with - or _), got {self.name!r}",
        )
        for k in ("steps", "save_every", "log_every"):
            v = getattr(self, k)
            _need(_is_int(v) and v > 0, where, f"{k} must be a positive integer, got {v!r}")
        for k in ("eval_every", "eval_tokens"):
            v = getattr(self, k)
            _need(_is_int(v) and v >= 0, where, f"{k} must be an integer >= 0, got {v!r}")
        _need(
            isinstance(self.activation_checkpointing, str) and self.activation_checkpointing in RECOMPUTE,
            where,
            f"activation_checkpointing must be one of {', '.join(RECOMPUTE)} (or true / false), got {self.activation_checkpointing!r}",
        )
        _need(
            self.activation_checkpointing != "full" or self.model.dropout == 0.0,
            where,
            "activation_checkpointing full needs model.dropout 0 (a recomputed block would draw other dropout masks; "
            "attention and mlp keep the dropout outside what they recompute)",
        )
        _need(self.compile in COMPILE, where, f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        _need(
            not (self.compile == "on" and self.layout.zero_stage == 3),
            where,
            "compile on needs zero_stage 1 or 2 (ZeRO-3 gathers parameters in hooks inside each block); use auto or off",
        )
        self.layout.check_model(self.model, f"{where}.layout")
        _need(self.stop.min_steps <= self.steps, f"{where}.stop", f"min_steps {self.stop.min_steps} > steps {self.steps}")
        _need(
            self.init_from is None or (self.init_from.partition(":")[0] in ("hf", "megatron") and self.init_from.partition(":")[2]),
            where,
            f"init_from must be hf:PATH (a transformers model directory) or megatron:PATH (a Megatron-LM "
            f"checkpoint directory), got {self.init_from!r}",
        )
        _need(
            self.device_memory_gb is None or self.device_memory_gb > 0,
            where,
            f"device_memory_gb must be a positive number of GB or null, got {self.device_memory_gb!r}",
        )


# training-state bytes per parameter: fp32 weights (master) + fp32 Adam moments + fp32 gradients (bf16
# accumulates them in fp32 too), + the bf16 weights the model computes with in bf16
STATE_BYTES = {"fp32": 4 + 8 + 4, "bf16": 4 + 8 + 4 + 2}


def stage_warnings(stage: Stage) -> list[str]:
    """One-line advice on a stage's layout; nothing here is an error (load_plan prints them)."""
    L, out = stage.layout, []
    if L.zero_stage == 2 and L.dp == 1:
        out.append(
            "zero_stage 2 at dp 1 partitions nothing and pays per-gradient hooks (2.3x ZeRO-1's step time "
            "measured on an H100, bench/gpu/README.md): use zero_stage 1"
        )
    if L.tp > 1 and stage.device_memory_gb:
        gb = stage.model.num_params() * STATE_BYTES[L.dtype] / 1e9
        if gb <= 0.5 * stage.device_memory_gb:
            out.append(
                f"tp {L.tp}: the model's training state ({gb:.1f} GB: {STATE_BYTES[L.dtype]} bytes/parameter, "
                f"{L.dtype}) fits in half of one {stage.device_memory_gb:g} GB device; tp 1 (more dp, or ZeRO) "
                "avoids tensor parallelism's all-reduces in every layer"
            )
    return out
