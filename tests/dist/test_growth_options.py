"""The plan's growth knobs (the savings experiment's ablations), through tools/regrow.py on a
real checkpoint: `growth: {symmetry_breaking: 0}` leaves the width copies identical (and 1.0,
the default, makes them differ), `growth: {optimizer_state: reset}` writes zero Adam moments
and step 0 (and "moved", the default, carries the grown moments and the step)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from conftest import REPO, _env, torchrun

PLAN = """name: go
seed: 5
data: {{prefix: {prefix}}}
defaults:
  optim: {{warmup_steps: 1}}
  steps: 3
  save_every: 100
  layout: {{tp: 1, dp: 1, zero_stage: 1, micro_batch: 2}}
stages:
  - name: a
    model: {{n_layers: 1, d_model: 32, n_heads: 2, vocab_size: 512, seq_len: 16}}
  - name: b
    model: {{n_layers: 1, d_model: 64, n_heads: 4, vocab_size: 512, seq_len: 16}}
    grow: width
{growth}"""


def test_symmetry_breaking_and_optimizer_reset_knobs(data_prefix, tmp_path):
    from megagrow.state.checkpoint import SourceCheckpoint

    plans = {}
    for key, growth in (("default", ""), ("ablated", "    growth: {symmetry_breaking: 0, optimizer_state: reset}\n")):
        plans[key] = tmp_path / f"{key}.yaml"
        plans[key].write_text(PLAN.format(prefix=data_prefix, growth=growth))
    run = tmp_path / "run"
    r = torchrun(1, ["-m", "megagrow.cli", "train", str(plans["default"]), "--stage", "a", "--run-dir", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    src = str(run / "a" / "checkpoints")
    got = {}
    for key, plan in plans.items():
        out = tmp_path / f"out_{key}"
        r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "regrow.py"), "--src", src, "--plan", str(plan),
                            "--to-stage", "b", "--out", str(out)], capture_output=True, text=True, env=_env(), cwd=REPO,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        got[key] = SourceCheckpoint.open(str(out))
    W = "blocks.0.mlp.fc1.weight"  # (4*64, 64): 2x2 blocks of the source's (128, 32)
    for key, ck in got.items():
        w = ck.read_box(W, "w", ((0, 256), (0, 64)))
        top, bottom = w[:128], w[128:]
        # each row of blocks sums to the source block whatever the noise (exact growth)
        assert torch.allclose(top[:, :32] + top[:, 32:], bottom[:, :32] + bottom[:, 32:], atol=1e-6)
        if key == "ablated":  # no noise: diagonal copies identical, off-diagonal zero
            assert torch.equal(top[:, :32], bottom[:, 32:]) and not top[:, 32:].any() and not bottom[:, :32].any()
        else:
            assert not torch.equal(top[:, :32], bottom[:, 32:]) and top[:, 32:].abs().max() > 1e-4
    for name in (W, "tok_emb.weight", "blocks.0.ln1.weight"):
        shape = got["default"].logical_shapes()[name]
        box = tuple((0, n) for n in shape)
        for state in ("m", "v"):
            assert not got["ablated"].read_box(name, state, box).any(), (name, state)  # reset: zeros
            assert got["default"].read_box(name, state, box).abs().max() > 0, (name, state)  # moved
    assert got["ablated"].adam_step() == 0 and got["default"].adam_step() == 3
