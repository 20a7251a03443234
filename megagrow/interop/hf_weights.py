"""transformers weights <-> megagrow's logical tensors, and importing a transformers model
directory as a stage's first checkpoint (`init_from: hf:PATH`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.interop.hf_config import check_matches, model_fields_from_hf, need_hf

if TYPE_CHECKING:  # torch is imported where tensors are made: reading configs stays light (the controller checks
    import torch  # init_from before it launches anything, without loading torch)


def to_hf(m: ModelConfig, read: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) of every weight of model `m`; `read(name)` gives megagrow's
    logical fp32 tensor `name` (called once per name). Vocabulary padding dropped."""
    import torch

    V = m.vocab_size
    if m.flavour == "gpt2":
        yield "transformer.wte.weight", read("tok_emb.weight")[:V]
        yield "transformer.wpe.weight", read("pos_emb.weight")
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            yield h + "ln_1.weight", read(b + "ln1.weight")
            yield h + "ln_1.bias", read(b + "ln1.bias")
            yield h + "attn.c_attn.weight", torch.cat([read(b + f"attn.{p}.weight") for p in "qkv"], 0).t()
            yield h + "attn.c_attn.bias", torch.cat([read(b + f"attn.{p}.bias") for p in "qkv"], 0)
            yield h + "attn.c_proj.weight", read(b + "attn.o.weight").t()
            yield h + "attn.c_proj.bias", read(b + "attn.o.bias")
            yield h + "ln_2.weight", read(b + "ln2.weight")
            yield h + "ln_2.bias", read(b + "ln2.bias")
            yield h + "mlp.c_fc.weight", read(b + "mlp.fc1.weight").t()
            yield h + "mlp.c_fc.bias", read(b + "mlp.fc1.bias")
            yield h + "mlp.c_proj.weight", read(b + "mlp.fc2.weight").t()
            yield h + "mlp.c_proj.bias", read(b + "mlp.fc2.bias")
        yield "transformer.ln_f.weight", read("ln_f.weight")
        yield "transformer.ln_f.bias", read("ln_f.bias")
    else:
        yield "model.embed_tokens.weight", read("tok_emb.weight")[:V]
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            yield h + "input_layernorm.weight", read(b + "ln1.weight")
            for p in "qkvo":
                yield h + f"self_attn.{p}_proj.weight", read(b + f"attn.{p}.weight")
            yield h + "post_attention_layernorm.weight", read(b + "ln2.weight")
            for p in ("gate", "up", "down"):
                yield h + f"mlp.{p}_proj.weight", read(b + f"mlp.{p}.weight")
        yield "model.norm.weight", read("ln_f.weight")
    if not m.tie_embeddings:
        yield "lm_head.weight", read("lm_head.weight")[:V]


def from_hf(m: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """megagrow's logical fp32 tensors of model `m` from a transformers state dict (`get(name)`);
    the vocabulary padded with zero rows, GPT-2's position table cut to m.n_positions rows (max_positions,
    else seq_len)."""
    import torch

    def pad(t):
        out = torch.zeros(m.padded_vocab, t.shape[1], dtype=torch.float32)
        out[: t.shape[0]] = t
        return out

    P: dict[str, torch.Tensor] = {}
    if m.flavour == "gpt2":
        P["tok_emb.weight"] = pad(get("transformer.wte.weight"))
        P["pos_emb.weight"] = get("transformer.wpe.weight")[: m.n_positions]
        A = m.attn_dim
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            P[b + "ln1.weight"], P[b + "ln1.bias"] = get(h + "ln_1.weight"), get(h + "ln_1.bias")
            w, bias = get(h + "attn.c_attn.weight").t(), get(h + "attn.c_attn.bias")
            for j, p in enumerate("qkv"):
                P[b + f"attn.{p}.weight"], P[b + f"attn.{p}.bias"] = w[j * A : (j + 1) * A], bias[j * A : (j + 1) * A]
            P[b + "attn.o.weight"], P[b + "attn.o.bias"] = get(h + "attn.c_proj.weight").t(), get(h + "attn.c_proj.bias")
            P[b + "ln2.weight"], P[b + "ln2.bias"] = get(h + "ln_2.weight"), get(h + "ln_2.bias")
            P[b + "mlp.fc1.weight"], P[b + "mlp.fc1.bias"] = get(h + "mlp.c_fc.weight").t(), get(h + "mlp.c_fc.bias")
            P[b + "mlp.fc2.weight"], P[b + "mlp.fc2.bias"] = get(h + "mlp.c_proj.weight").t(), get(h + "mlp.c_proj.bias")
        P["ln_f.weight"], P["ln_f.bias"] = get("transformer.ln_f.weight"), get("transformer.ln_f.bias")
    else:
        P["tok_emb.weight"] = pad(get("model.embed_tokens.weight"))
        for i in range(m.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            P[b + "ln1.weight"] = get(h + "input_layernorm.weight")
            for p in "qkvo":
                P[b + f"attn.{p}.weight"] = get(h + f"self_attn.{p}_proj.weight")
            P[b + "ln2.weight"] = get(h + "post_attention_layernorm.weight")
            for p in ("gate", "up", "down"):
                P[b + f"mlp.{p}.weight"] = get(h + f"mlp.{p}_proj.weight")
        P["ln_f.weight"] = get("model.norm.weight")
    if not m.tie_embeddings:
        P["lm_head.weight"] = pad(get("lm_head.weight"))
    return {n: t.float().contiguous() for n, t in P.items()}


def read_hf_dir(path: str) -> tuple[dict, dict, dict]:
    """(config.json, the ModelConfig fields it fixes, {weight name or None: weights file}) of a
    transformers model directory: safetensors (one file or sharded with an index), else PyTorch
    pytorch_model.bin (likewise); json and os only (no torch, no transformers)."""
    if not os.path.isdir(path):
        raise UserError(f"transformers model directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: no config.json (not a transformers model directory)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        fields = model_fields_from_hf(config, path)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: not a readable transformers config ({type(e).__name__}: {e})") from None
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        single, index = os.path.join(path, single), os.path.join(path, index)
        if os.path.isfile(single):
            return config, fields, {None: single}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{index}: not a readable weights index ({type(e).__name__}: {e})") from None
            return config, fields, {n: os.path.join(path, fn) for n, fn in wm.items()}
    raise UserError(
        f"{path}: no model.safetensors, pytorch_model.bin or index of either (model.safetensors.index.json, pytorch_model.bin.index.json)"
    )


def check_init_from(stage) -> None:
    """The checks of a stage's `init_from` that need no weights (json only, no torch): hf:PATH the directory,
    its config against the stage's model, a weights file; megatron:PATH the tracker, the checkpoint file and
    the model megagrow.json records. UserError naming the first problem."""
    kind, path = init_source(stage.init_from)
    if kind == "megatron":
        from megagrow.interop.megatron import check_megatron_dir

        check_megatron_dir(path, stage.model, stage.name)
        return
    _, fields, _ = read_hf_dir(path)
    check_matches(fields, stage.model, path, stage.name)


class _TorchFile:
    """A pytorch_model.bin read like a safetensors file: torch.load with weights_only=True (tensors
    and plain containers only: no code in the file runs) and mmap=True (tensors are read from the
    file as used, not all into memory at once)."""

    def __init__(self, fn: str):
        import torch

        sd = torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(sd, dict):
            raise ValueError(f"holds a {type(sd).__name__}, not a state dict")
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def get_tensor(self, name: str):
        return self.sd[name]


class HFCheckpoint:
    """A transformers model directory on disk: config.json + model.safetensors or pytorch_model.bin
    (or sharded, with an index). Tensors are read one at a time (both memory-mapped)."""

    def __init__(self, path: str):
        need_hf()
        self.path = path
        self.config, self.fields, self.files = read_hf_dir(path)
        self._open: dict = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fn = self.files.get(name, self.files.get(None))
        if fn is None or not os.path.isfile(fn):
            raise UserError(f"{self.path}: weight {name} is missing" + (f" (file {fn} not found)" if fn else ""))
        if fn not in self._open:
            try:
                self._open[fn] = _TorchFile(fn) if fn.endswith(".bin") else safe_open(fn, framework="pt")
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise UserError(f"cannot read {fn}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        f = self._open[fn]
        if name not in f.keys():
            raise UserError(f"{self.path}: weight {name} is missing from {os.path.basename(fn)}")
        return f.get_tensor(name)

    def tensors_for(self, m: ModelConfig, stage: str = "?") -> dict[str, torch.Tensor]:
        """megagrow's logical tensors for stage model `m` (checked against config.json and shapes)."""
        from megagrow.growth.ops import logical_tensors

        check_matches(self.fields, m, self.path, stage)
        P = from_hf(m, self.get)
        for n, s in logical_tensors(m).items():
            if tuple(P[n].shape) != tuple(s):
                raise UserError(f"{self.path}: weight for {n} has shape {tuple(P[n].shape)}, the config says {tuple(s)}")
        return P


# ---------------------------------------------------------------------------------------
# import: a transformers model as a stage's first checkpoint


class _Zeros:
    """old[name][slices] -> zeros: the (fresh) Adam moments of an imported model."""

    def __init__(self, params: dict):
        self.params = params

    def __contains__(self, name):
        return name in self.params

    def __getitem__(self, name):
        import torch

        t = self.params[name]

        class _View:
            def __getitem__(self, slices):
                return torch.zeros_like(t[slices])

        return _View()


class WeightsSource:
    """In-memory logical weights with the reading interface of a SourceCheckpoint that the
    shard-to-shard executor fills an engine from: weights as given, Adam moments zero, step 0."""

    def __init__(self, params: dict):
        self.params = params
        self.bytes_read = 0

    def lazy(self, state: str):
        return self.params if state == "w" else _Zeros(self.params)

    def adam_step(self) -> int:
        return 0


INIT_KINDS = ("hf", "megatron")  # init_from: hf:PATH (transformers directory), megatron:PATH (Megatron-LM checkpoint)


def init_source(spec: str) -> tuple[str, str]:
    """(kind, directory) of an `init_from: hf:PATH` or `megatron:PATH` spec."""
    kind, _, path = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind not in INIT_KINDS or not path:
        raise UserError(
            f"init_from must be hf:PATH (a transformers model directory) or megatron:PATH (a Megatron-LM "
            f"checkpoint directory), got {spec!r}"
        )
    return kind, os.path.expanduser(path)


def parse_init_from(spec: str) -> str:
    """The directory of an `init_from: hf:PATH` spec."""
    kind, path = init_source(spec)
    if kind != "hf":
        raise UserError(f"init_from must be hf:PATH (a transformers model directory), got {spec!r}")
    return path


def import_checkpoint(plan, k: int, out_dir: str, progress: bool = False) -> dict:
    """Stage k's step-0 checkpoint in `out_dir`, at its layout, from the transformers model its
    `init_from: hf:PATH` names (or the Megatron-LM checkpoint of `megatron:PATH`): weights only (Adam moments zero, step 0, data position 0).
    Every rank reads the tensors it needs from the weights files (memory-mapped) and
    fills its own fragments through the shard-to-shard executor; DeepSpeed writes the files.
    Process groups must be initialised for stage k's layout."""

    from megagrow import collectives
    from megagrow.growth.ops import Identity, plan_growth
    from megagrow.parallel.engine import build_stage
    from megagrow.paths import tag_of
    from megagrow.state.executor import fill_engine, init_optimizer_state
    from megagrow.state.record import StageRecord

    stage = plan.stages[k]
    kind, path = init_source(stage.init_from)
    if kind == "megatron":
        from megagrow.interop.megatron import MegatronCheckpoint

        hf = MegatronCheckpoint(path)
    else:
        hf = HFCheckpoint(path)
    params = hf.tensors_for(stage.model, stage.name)
    gp = plan_growth(Identity(), stage.model)
    engine, optimizer = build_stage(plan, k, init=False)  # every weight is written below
    init_optimizer_state(engine, optimizer)
    info = fill_engine(engine, gp.tensors, WeightsSource(params), plan.seed, progress)
    cs = StageRecord(plan, k).to_client_state()  # step 0, data position 0, schedule from its start
    cs["init_from"] = {kind: os.path.abspath(path), "config": hf.config}
    engine.global_steps = 0
    engine.save_checkpoint(out_dir, tag=tag_of(0), client_state=cs)
    collectives.barrier()
    del engine, optimizer
    return {"init_from": os.path.abspath(path), "tag": tag_of(0), **info}
