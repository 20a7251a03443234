"""Shard-to-shard resharding and growth between layouts, on CPU/gloo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, _env, run_worker, torchrun


def test_reshard_round_trip_is_bitwise(data_prefix, tmp_path):
    """Identity regrow from layout A to B (TP 1<->2, DP 1<->2, ZeRO 1/2/3, fp32 and bf16, plus 3 random
    small models and layout pairs): every fp32 weight, exp_avg and exp_avg_sq read back from B equals
    A bitwise, through megagrow's reader and (TP=1) DeepSpeed's zero_to_fp32; each rank reads at most
    1.5x the bytes of its own share (whole rows of a matrix are read) and opens exactly the source files
    its boxes need (the metadata file + those optimizer files; before: all tp x dp on every rank)."""
    res = run_worker(2, "reshard", data_prefix, tmp_path)
    assert len(res) == 8
    for key, r in res.items():
        for opened, needed, files in r["opens"]:
            assert opened == 1 + needed and needed <= files, (key, r["opens"])
        assert r["mismatched"] == [], key
        assert r["tensors"] >= 3 * 7, key
        assert r.get("zero_to_fp32_mismatched", []) == [], key
        assert r["max_read_over_share"] <= 1.5, (key, r)


def test_growth_sharded_equals_gathered_and_keeps_loss(data_prefix, tmp_path):
    """Stage 0 at layout A -> grown stage 1 at layout B (A != B) through the trainer's transition, for
    width x2, depth x2, FFN and heads-only growth, gpt2 and llama, plus depth (append), G_stack, width x3, and width
    and heads growth of a llama with grouped-query attention (2 K/V heads, group size kept): the
    grown checkpoint equals the growth map applied to the gathered source, bitwise, for weights and both
    Adam moments; the Adam step and the data position carry over; eval loss before == after within 1e-5
    (G_stack: documented as not loss preserving, so only the bitwise property); training continues at B, on
    the engine the transition built, with losses bitwise equal to a fresh engine loading the grown checkpoint."""
    res = run_worker(2, "grow", data_prefix, tmp_path)
    assert len(res) == 13
    for key, r in res.items():
        assert r["mismatched"] == [], key
        assert r["adam_step"][0] == r["adam_step"][1] == 3, key
        assert r["sample_offset"] > 0, key
        if r["exact"]:
            assert abs(r["loss_before"] - r["loss_after"]) < 1e-5, (key, r)
        assert len(r["losses_s1"]) == 2 and r["losses_s1"][1] < r["losses_s1"][0], (key, r)
        assert r["losses_s1"] == r["losses_s1_resumed"], (key, r)


PLAN = """name: rg
seed: 5
data: {{prefix: {prefix}}}
defaults:
  optim: {{warmup_steps: 2}}
  steps: 2
  save_every: 100
stages:
  - name: a
    model: {{n_layers: 1, d_model: 32, n_heads: 2, vocab_size: 512, seq_len: 16}}
    layout: {{tp: 1, dp: 2, zero_stage: 2, micro_batch: 2}}
  - name: b
    model: {{n_layers: 2, d_model: 32, n_heads: 2, vocab_size: 512, seq_len: 16}}
    layout: {{tp: 2, dp: 1, zero_stage: 1, micro_batch: 2}}
    grow: depth
"""


def _regrow_srun(n: int, *args) -> dict:
    """tools/regrow.py's ranks started as srun starts them (SLURM_PROCID/SLURM_NTASKS, no RANK); rank 0's --json summary."""
    from megagrow.parallel.groups import free_port

    port, procs = str(free_port()), []
    for r in range(n):
        env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SLURM_PROCID=str(r), SLURM_NTASKS=str(n), SLURM_LOCALID=str(r))
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "regrow.py"), *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("{")][0])


def _regrow(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "regrow.py"), *args], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=300)


def test_regrow_cli_end_to_end_and_bad_input(data_prefix, tmp_path):
    """tools/regrow.py under torchrun writes a loadable checkpoint and a JSON summary; bad input (wrong
    stage, missing tag, truncated file, non-empty output) is one 'error:' line, exit 2, nothing written.
    --dry-run (no ranks, no tensors; from the real source's metadata, or from the plan's stage 0 layout alone)
    predicts every rank's files opened, bytes read and state bytes exactly as the run counted them."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(prefix=data_prefix))
    run = tmp_path / "run"
    r = torchrun(2, ["-m", "megagrow.cli", "train", str(plan), "--stage", "a", "--run-dir", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    src = str(run / "a" / "checkpoints")
    out = tmp_path / "out"
    # started directly (no torchrun): it validates, then starts the target layout's 2 ranks itself
    r = _regrow("--src", src, "--plan", str(plan), "--to-stage", "b", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][0])
    assert summary["op"]["op"] == "depth" and summary["layout"]["tp"] == 2 and len(summary["bytes_read_per_rank"]) == 2
    assert os.path.isfile(out / "latest") and not os.path.exists(f"{out}.regrow-tmp")
    from megagrow.state.manifest import choose, problems
    assert choose(str(out))[0] == summary["tag"] and problems(str(out / summary["tag"])) == []  # sealed: manifest, sizes, CRC-32
    # started directly: the ranks are forked from the launcher, and each checks the files it opens, as under srun
    assert summary["files_unverified_per_rank"] == [0, 0] and 0 < sum(summary["files_verified_per_rank"]) <= 3, summary
    # as srun starts it (SLURM_PROCID set, RANK unset): every source file a rank opens is checked once, by a
    # rank that opens it, rank 0 also the metadata file every rank opens (before: every rank checked every
    # file); no rank opens a file no rank checked; the dry run predicts who checks what
    srun_out = tmp_path / "out_srun"
    srun = _regrow_srun(2, "--src", src, "--plan", str(plan), "--to-stage", "b", "--out", str(srun_out), "--json")
    assert srun["files_unverified_per_rank"] == [0, 0], srun
    assert all(v <= o for v, o in zip(srun["files_verified_per_rank"], srun["files_opened_per_rank"])), srun
    assert sum(srun["files_verified_per_rank"]) <= 3, srun  # the source has 3 files: each checked at most once
    dry = json.loads(_regrow("--src", src, "--plan", str(plan), "--to-stage", "b", "--dry-run", "--json").stdout)
    assert dry["verify_files_per_rank"] == srun["files_verified_per_rank"], (dry, srun)
    keys = ("files_opened_per_rank", "bytes_read_per_rank", "state_bytes_per_rank")
    for src_args in (["--src", src], []):
        r = _regrow(*src_args, "--plan", str(plan), "--to-stage", "b", "--dry-run", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        dry = json.loads(r.stdout)
        assert {k: dry[k] for k in keys} == {k: summary[k] for k in keys}, (src_args, dry, summary)

    other = tmp_path / "other.yaml"  # stage a of this plan has another model: the source does not fit
    other.write_text(PLAN.format(prefix=data_prefix).replace("n_layers: 1, d_model: 32", "n_layers: 1, d_model: 48", 1))

    def bad(args, needle, plan=plan):
        target = tmp_path / "bad_out"
        r = _regrow(*args, "--plan", str(plan), "--out", str(target))
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1 and needle in r.stderr, r.stderr
        assert not os.path.exists(target) and not os.path.exists(f"{target}.regrow-tmp")

    bad(["--src", src, "--to-stage", "a"], "takes a checkpoint of stage 0 itself", plan=other)
    bad(["--src", src, "--to-stage", "b", "--tag", "nope"], "tag 'nope' not found")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    f = sorted((broken / "step_00000002").glob("*optim_states.pt"))[0]
    f.write_bytes(f.read_bytes()[:1000])
    # the only tag is torn: refused, naming the file and why (no older complete checkpoint to fall back to)
    bad(["--src", str(broken), "--to-stage", "b"], "no complete checkpoint (step_00000002: zero_pp_rank_0_mp_rank_00_optim_states.pt: size 1000 !=")
    r = _regrow("--src", src, "--plan", str(plan), "--to-stage", "b", "--out", str(out))
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
