"""Sharded export-hf of a real checkpoint (launched by tests/dist/test_hf_sharded_export.py with torchrun, one rank):

    torchrun --nproc_per_node=1 tests/dist/hf_sharded_worker.py DATA_PREFIX OUT_DIR

Trains a ~51M-parameter llama one step (fp32 checkpoint, ZeRO-1), exports it with `export-hf` three times in
child processes (default shard size, --max-shard-size 16MB, --max-shard-size 8MB --dtype bf16), each child
measuring its own peak memory from just before the export (VmHWM reset through /proc/self/clear_refs, after
every import), and loads the exports with transformers; exports it with `export-megatron` (tools/export_megatron.py)
and loads that into megatron-core's GPTModel (local spec) strictly; imports it back as `init_from: megatron:`.
Writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: megatron_ref

import torch  # noqa: E402
from worker import tiny_plan  # noqa: E402

from megagrow.parallel.groups import init_distributed  # noqa: E402

# the child: imports everything the export needs, resets the peak-RSS counter, exports, reports RSS before and peak
MEASURE = r"""
import json, sys
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast  # noqa: F401 (imported before the measurement)
import safetensors.torch, tqdm  # noqa: F401
from megagrow.cli.export import export
import megagrow.interop.hf_export, megagrow.state.checkpoint  # noqa: F401

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
s = export(sys.argv[1], sys.argv[2], no_tokenizer=True, dtype=sys.argv[3], max_shard_size=sys.argv[4])
print(json.dumps({"rss_before": before, "peak": kib("VmHWM"), "summary": s}))
"""


def _export(ckpt: str, out: str, dtype: str, size: str) -> dict:
    r = subprocess.run([sys.executable, "-c", MEASURE, ckpt, out, dtype, size], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    if r.returncode != 0:
        raise RuntimeError(f"export child failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _megatron(ckpt: str, dest: str, m, x: torch.Tensor, hf_logits: torch.Tensor) -> dict:
    """`export-megatron` in a child process, then megatron-core's GPTModel loading it strictly: its logits
    against transformers' of the export-hf export; the same command onto the now non-empty destination."""
    from megatron_ref import megatron_gpt, megatron_logits

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                        "export_megatron.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, tool, ckpt, dest, "--json"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"export-megatron failed:\n{r.stderr[-4000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    payload = torch.load(summary["file"], weights_only=True)
    model = megatron_gpt(m)
    model.load_state_dict(payload["model"], strict=True)
    theirs = megatron_logits(model, x)[..., :m.vocab_size]
    again = subprocess.run([sys.executable, tool, ckpt, dest], capture_output=True, text=True, env=env)
    return {"summary": summary, "max_abs_diff": (theirs - hf_logits).abs().max().item(),
            "tracker": open(os.path.join(dest, "latest_checkpointed_iteration.txt")).read(),
            "again_rc": again.returncode, "again_stderr": again.stderr}


def _megatron_import(plan, mcore: str, ckpt: str, dest: str) -> dict:
    """`init_from: megatron:MCORE` through the importer (import_checkpoint: the stage's step-0 checkpoint at its
    layout): the tensors it holds against the trained checkpoint's, bitwise, and its Adam step."""
    from megagrow.cli.export import resolve_checkpoint
    from megagrow.hf import import_checkpoint
    from megagrow.state.checkpoint import SourceCheckpoint

    plan = plan.replace(stages=(plan.stages[0].replace(init_from=f"megatron:{mcore}"),))
    info = import_checkpoint(plan, 0, dest)
    a, b = SourceCheckpoint.open(dest, info["tag"]), SourceCheckpoint.open(*resolve_checkpoint(ckpt, None))
    shapes = b.logical_shapes()
    box = {n: tuple((0, k) for k in s) for n, s in shapes.items()}
    unequal = [n for n in shapes if not torch.equal(a.read_box(n, "w", box[n]), b.read_box(n, "w", box[n]))]
    zero_m = all(not a.read_box(n, "m", box[n]).any() for n in shapes)
    return {"tensors": len(shapes), "unequal": unequal, "same_shapes": a.logical_shapes() == shapes,
            "adam_step": a.adam_step(), "moments_zero": zero_m, "source": a.client.get("init_from", {}).get("megatron")}


def main(prefix: str, out: str) -> dict:
    from transformers import AutoModelForCausalLM

    from megagrow.train import train_stage

    plan = tiny_plan(prefix, "llama", steps=1, tie=False, tp=1, dp=1, zero_stage=1, micro_batch=1, grad_accum=1)
    st = plan.stages[0]
    plan = plan.replace(stages=(st.replace(model=st.model.replace(n_layers=4, d_model=1024, n_heads=8, head_dim=128), eval_tokens=0),))
    init_distributed(plan.stages[0].layout)
    run = os.path.join(out, "run")
    train_stage(plan, 0, run, quiet=True)
    ckpt = os.path.join(run, "s0")
    res = {"params": plan.stages[0].model.num_params(), "model": plan.stages[0].model.to_dict()}
    for key, dtype, size in (("one", "fp32", "5GB"), ("sharded", "fp32", "16MB"), ("bf16", "bf16", "8MB")):
        dest = os.path.join(out, key)
        res[key] = _export(ckpt, dest, dtype, size)
        res[key]["files"] = sorted(os.listdir(dest))
        res[key]["leftovers"] = [f for f in os.listdir(out) if f.endswith(".export-tmp")]
    x = torch.randint(0, plan.stages[0].model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for key in ("one", "sharded"):
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, key), dtype=torch.float32).eval()
        with torch.no_grad():
            logits[key] = model(x).logits
        del model
    res["logits_equal"] = bool(torch.equal(logits["one"], logits["sharded"]))
    res["megatron"] = _megatron(ckpt, os.path.join(out, "mcore"), plan.stages[0].model, x, logits["one"])
    res["megatron_import"] = _megatron_import(plan, os.path.join(out, "mcore"), ckpt, os.path.join(out, "imported"))
    res["max_abs_logit"] = logits["one"].abs().max().item()
    with open(os.path.join(out, "sharded", "model.safetensors.index.json")) as f:
        res["index"] = json.load(f)
    return res


if __name__ == "__main__":
    prefix, out = sys.argv[1:3]
    result = main(prefix, out)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
