"""The DeepSpeed engine for one stage: its config is derived from the typed Stage config.

A stage may name a DeepSpeed JSON (`layout.ds_config`, e.g. ds_configs/zero3.json) for
engine tuning (bucket sizes, overlap, ZeRO-3 thresholds). The keys megagrow owns (batch
sizes, ZeRO stage, precision, optimizer, clipping) come from the typed config; a JSON that
sets one of them to something else is rejected instead of silently winning or losing.
"""

from __future__ import annotations

import json
import os

import torch

from megagrow.config import Plan, Stage
from megagrow.errors import UserError
from megagrow.parallel.groups import MPU

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_ds_config(path: str) -> str:
    """A ds_config path as given, else relative to the repository (ds_configs/ ships there)."""
    for cand in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(cand):
            return cand
    raise UserError(f"DeepSpeed config not found: {path}", all_ranks=True)


def _nccl() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().communication_backend_name() == "nccl"


def overlap_defaults(stage: Stage) -> dict:
    """zero_optimization keys that overlap the gradient reduction with the backward pass at DP > 1,
    where DeepSpeed's ZeRO-1/2 optimizer runs (docs/measure.md, "Gradient reduction overlap").

    Buckets: Megatron-LM's DDP size, max(4e7, 1e6 x dp) elements, at most this rank's TP shard of
    the model (then one bucket: nothing to overlap is lost, nothing is over-allocated). bf16 at
    ZeRO-1 gets none: with gradients accumulated in fp32 (below), DeepSpeed 0.19 runs its
    BF16_Optimizer there, which reduces after the backward and has no overlap."""
    L = stage.layout
    if L.dp == 1 or L.zero_stage not in (1, 2) or (L.zero_stage == 1 and L.dtype == "bf16"):
        return {}
    bucket = int(min(max(4e7, 1e6 * L.dp), max(1, stage.model.num_params() // L.tp)))
    return {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}


def ds_config(stage: Stage, overlap: bool | None = None) -> dict:
    """The DeepSpeed config of `stage`. overlap: the gradient-reduction overlap defaults
    (overlap_defaults; keys the stage's JSON sets win); None: on NCCL only (on gloo overlap_comm
    makes steps many times slower, ds_configs/README.md)."""
    L, o = stage.layout, stage.optim
    owned = {
        "train_micro_batch_size_per_gpu": L.micro_batch,
        "gradient_accumulation_steps": L.grad_accum,
        "train_batch_size": L.global_batch,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no JIT-built fused/CPU Adam op needed
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": L.dtype == "bf16"},
    }
    cfg: dict = {}
    if L.ds_config:
        path = resolve_ds_config(L.ds_config)
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})", all_ranks=True) from None
        if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization", {}), dict):
            raise UserError(f"{path}: expected a JSON object of DeepSpeed settings (zero_optimization an object too)", all_ranks=True)
        for k, v in owned.items():
            if k in cfg and k != "bf16" and cfg[k] != v:
                raise UserError(
                    f"{path}: key {k!r} is set by the stage config (layout/optim); remove it from the JSON", all_ranks=True
                )  # every rank reads the same file: rank 0 says it
        stage_in_json = cfg.get("zero_optimization", {}).get("stage")
        if stage_in_json is not None and stage_in_json != L.zero_stage:
            raise UserError(
                f"{path}: zero_optimization.stage {stage_in_json} disagrees with layout.zero_stage {L.zero_stage}", all_ranks=True
            )
    cfg.update({k: v for k, v in owned.items() if k != "bf16"})
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": L.dtype == "bf16"}
    cfg.setdefault("zero_optimization", {})["stage"] = L.zero_stage
    if overlap or (overlap is None and L.dp > 1 and _nccl()):
        for k, v in overlap_defaults(stage).items():
            cfg["zero_optimization"].setdefault(k, v)
    if L.dtype == "bf16":
        # keep gradient accumulation and DP reduction in fp32 (matches the fp32 master)
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or norm gains (a ZeRO-3 partitioned
    parameter is judged by its shape before partitioning, ds_shape)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, stage: Stage, cfg: dict | None = None):
    import logging

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # DeepSpeed's per-engine memory/config banners
    from megagrow.nocompile import deepspeed_muon

    deepspeed_muon()  # before initialize imports it: no torch.compile (megagrow/nocompile.py)

    cfg = ds_config(stage) if cfg is None else cfg
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, stage.optim.weight_decay), config=cfg, mpu=MPU()
    )
    return engine, optimizer


DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _zero3_init(cfg: dict):
    """deepspeed.zero.Init for building a model partitioned as the engine of `cfg` keeps it.

    It partitions over the world unless given the data-parallel group (as the engine gives
    it). Three of its defaults are not wanted here: its `dtype` argument is ignored on an
    accelerator without fp16 (the CPU one: everything would become bf16), so the dtype comes
    from the config's bf16 flag, as the engine's does; its dtype override would also turn
    float tensors made during construction (the float64 RoPE tables) into the training dtype,
    so only the device override is kept (the model gives its parameters their dtype itself);
    and its memory-efficient linear replaces torch.nn.functional.linear process-wide, for
    good, so it is switched off."""
    import copy

    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    cfg = copy.deepcopy(cfg)
    cfg["zero_optimization"]["memory_efficient_linear"] = False
    mpu = MPU()
    return deepspeed.zero.Init(
        config_dict_or_path=cfg,
        mpu=mpu,
        data_parallel_group=mpu.get_data_parallel_group(),
        tensor_overrides=[DeepSpeedTensorOverride.device],
    )


def build_stage(plan: Plan, k: int, init: bool = True, overlap: bool | None = None):
    """Model and DeepSpeed engine for stage k of `plan` (process groups already initialised).
    init=False skips drawing initial weights (the caller overwrites every one of them). overlap: the
    gradient-reduction overlap (ds_config's; None: its default).

    At ZeRO-3 the model is built inside deepspeed.zero.Init: each layer's parameters are
    partitioned over the data-parallel group as soon as the layer is made (a rank holds at
    most one layer's TP shard whole, for a moment), and each rank draws only its own
    partition. At ZeRO-1/2 every rank keeps its whole TP shard of the weights anyway; it
    draws just that."""
    import contextlib

    from megagrow.model.gpt import GPT, init_weights

    stage = plan.stages[k]
    dtype = DTYPE[stage.layout.dtype]
    cfg = ds_config(stage, overlap)
    making = contextlib.nullcontext()
    if stage.layout.zero_stage == 3:
        making = _zero3_init(cfg)
    with making:
        model = GPT(stage.model, dtype)
    if init:
        init_weights(model, plan.seed)
    configure_model(model, stage)
    return build_engine(model, stage, cfg)


def compile_on(stage: Stage) -> bool:
    """Stage.compile resolved: auto is on where DeepSpeed's accelerator is CUDA, except at ZeRO-3 (its
    parameter gathering runs in module hooks inside each block, which torch.compile would trace)."""
    if stage.compile == "auto":
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().device_name() == "cuda" and stage.layout.zero_stage != 3
    return stage.compile == "on"


def configure_model(model: torch.nn.Module, stage: Stage) -> None:
    """The stage's execution options on a model built for it, before DeepSpeed takes it: what each
    block recomputes, the fused Q/K/V (and gate/up) GEMMs, the chunked loss, and torch.compile of
    each transformer block (Stage.compile; the parameters and their names stay the block's own,
    so checkpoints, growth and ZeRO's gradient hooks see the same model)."""
    model.activation_checkpointing = stage.activation_checkpointing
    model.fused_qkv = stage.fused_qkv
    model.chunked_loss = stage.chunked_loss
    if compile_on(stage):
        compile_blocks(model)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (nn.Module.compile: the module, its parameters and
    their names stay; its calls run the compiled code)."""
    for block in model.blocks:
        block.compile()


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
