"""Exports every transformers version reads (launched by tests/dist/test_hf_export.py with torchrun, one rank):

    torchrun --nproc_per_node=1 tests/dist/hf_export_worker.py DATA_PREFIX OUT_DIR

Trains tiny models 2 steps, exports them with megagrow.cli.export, reads the files back as JSON (the
fields transformers 4.x reads) and through the installed transformers' Auto classes, and compares the
logits with megagrow's own model. Writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from hf_worker import megagrow_logits, tokens  # noqa: E402
from megagrow.parallel.groups import init_distributed  # noqa: E402
from worker import tiny_plan  # noqa: E402


class _Seen(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def exports(prefix: str, out: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from megagrow.cli.export import export as export_hf
    from megagrow.train import train_stage

    seen = _Seen()
    logging.getLogger("transformers").addHandler(seen)
    long_text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py")).read()
    res = {}
    cases = [("gpt2", True, {}), ("llama", False, {"rope_theta": 5e5}), ("llama_gqa", True, {"rope_theta": 1e6})]
    for flavour, tie, extra in cases:
        plan = tiny_plan(prefix, flavour, steps=2, tie=tie, tp=1, dp=1, zero_stage=2)
        plan = plan.replace(stages=(plan.stages[0].replace(model=plan.stages[0].model.replace(**extra)),))
        m = plan.stages[0].model
        key = f"{flavour}-tie{int(tie)}"
        run = os.path.join(out, key)
        init_distributed(plan.stages[0].layout)
        train_stage(plan, 0, run, quiet=True)
        hf_dir = os.path.join(out, key + "-hf")
        export_hf(os.path.join(run, "s0"), hf_dir)
        cfg, tc = _json(os.path.join(hf_dir, "config.json")), _json(os.path.join(hf_dir, "tokenizer_config.json"))
        gen = _json(os.path.join(hf_dir, "generation_config.json"))
        x = tokens(m.vocab_size)
        mine = megagrow_logits(os.path.join(run, "s0", "checkpoints"), x)
        auto_cfg = AutoConfig.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(hf_dir)
        cut = tok(long_text, truncation=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            theirs = model(x).logits
            model(cut)  # a truncated text fits the model
        rp = getattr(auto_cfg, "rope_parameters", None) or {}
        res[key] = {
            "model": m.to_dict(),
            "config": cfg, "tokenizer_config": tc, "generation_config": gen,
            "auto_rope_theta": rp.get("rope_theta", getattr(auto_cfg, "rope_theta", None)) if flavour != "gpt2" else None,
            "tokenizer_type": type(tok).__name__, "truncated_len": int(cut.shape[1]),
            "untruncated_len": len(tok(long_text)["input_ids"]),
            "max_abs_diff": (mine - theirs).abs().max().item(), "max_abs": mine.abs().max().item(),
        }
    res["transformers_messages"] = seen.messages
    return res


if __name__ == "__main__":
    prefix, out = sys.argv[1:3]
    result = exports(prefix, out)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
