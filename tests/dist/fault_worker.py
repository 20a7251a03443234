"""Fault-injection trials: kill -9 ranks at chosen points, rerun, compare with an uninterrupted run.

    python tests/dist/fault_worker.py SUITE DATA_PREFIX OUT_DIR TRIALS SEED

SUITE: "save" (training saves of a stage), "transition" (growing into the next stage),
"regrow" (tools/regrow.py). This process imports torch/DeepSpeed/megagrow once and forks the
ranks of every launch (real processes, real SIGKILL via megagrow.faults, gloo between them), so
a launch costs no import time. For each trial, seeded: a fault (point, rank or every rank,
step, file count); the faulted launch; the newest complete checkpoint it left (checked: every
checksum matches); the rerun, which must resume from exactly that one (its own report) and finish;
then every fp32 weight, exp_avg and exp_avg_sq of the final checkpoint and every logged loss
must equal the uninterrupted run's bitwise. Writes OUT_DIR/result.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402,F401
import deepspeed  # noqa: E402,F401

from megagrow.config import DataConfig, Layout, ModelConfig, OptimConfig, Plan, Reliability, Stage  # noqa: E402
from megagrow.parallel.groups import free_port  # noqa: E402
from megagrow.state import manifest  # noqa: E402

WORLD = 2
TIMEOUT_S = 20.0  # collective timeout in the faulted launches: a survivor never waits longer


def plan_of(prefix: str) -> Plan:
    m = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=512, seq_len=16)
    o = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1)
    a = Stage(name="a", model=m, layout=Layout(tp=1, dp=2, zero_stage=2, micro_batch=2), optim=o, steps=6, save_every=2, log_every=1)
    b = Stage(name="b", model=m.replace(n_layers=2), layout=Layout(tp=2, dp=1, zero_stage=1, micro_batch=2), optim=o, steps=2,
              save_every=2, log_every=1, grow="depth")
    return Plan(name="f", seed=11, data=DataConfig(prefix=prefix), stages=(a, b),
                reliability=Reliability(collective_timeout_s=TIMEOUT_S, keep_last=2))


# ---------------------------------------------------------------------------------- launches


def _child(fn, rank: int, port: int, fault: dict | None, log_path: str) -> None:
    """In the forked rank: the environment of a launched rank, then fn(); exit with its code."""
    code = 1
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        if fault:
            os.environ["MEGAGROW_FAULT"] = json.dumps(fault)
        else:
            os.environ.pop("MEGAGROW_FAULT", None)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        from megagrow import faults

        faults._loaded, faults._spec, faults._step = False, None, None
        code = fn()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - the child's outcome is its exit code
        from megagrow.cli import _peer_lost
        from megagrow.errors import EXIT_PEER_LOST, MegagrowError

        code = EXIT_PEER_LOST if _peer_lost(e) else getattr(e, "exit_code", 2) if isinstance(e, MegagrowError) else 1
        print(f"child rank {rank}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(fn, fault: dict | None, log_path: str, grace_s: float = 60.0) -> dict:
    """Fork WORLD ranks running fn; wait; returns {"codes", "seconds", "peer_stop_s"}."""
    port = free_port()
    pids = []
    for r in range(WORLD):
        pid = os.fork()
        if pid == 0:
            _child(fn, r, port, fault, log_path)
        pids.append(pid)
    t0 = time.time()
    codes, first_exit = {}, None
    while len(codes) < WORLD:
        for r, pid in enumerate(pids):
            if r in codes:
                continue
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                codes[r] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                first_exit = first_exit or time.time()
        if first_exit and time.time() - first_exit > grace_s:
            for r, pid in enumerate(pids):
                if r not in codes:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return {"codes": [codes[r] for r in range(WORLD)], "seconds": round(time.time() - t0, 2),
            "peer_stop_s": round(time.time() - first_exit, 2) if first_exit else None}


def train_fn(plan: Plan, k: int, run_dir: str):
    def fn():
        from megagrow.train import train_stage

        return train_stage(plan, k, run_dir, quiet=False)

    return fn


def regrow_fn(src: str, plan_path: str, out: str):
    def fn():
        from megagrow.cli.regrow import main

        return main(["--src", src, "--plan", plan_path, "--to-stage", "b", "--out", out, "--json"])

    return fn


# ---------------------------------------------------------------------------------- checks


def logical(ckpt_dir: str) -> dict:
    from megagrow.state.checkpoint import SourceCheckpoint

    ck = SourceCheckpoint.open(ckpt_dir)
    return {(n, s): ck.read_box(n, s, tuple((0, d) for d in shape)) for n, shape in ck.logical_shapes().items()
            for s in ("w", "m", "v")}


def same_state(a: str, b: str) -> list[str]:
    A, B = logical(a), logical(b)
    return sorted(f"{n}/{s}" for (n, s) in A if (n, s) not in B or not torch.equal(A[(n, s)], B[(n, s)])) + \
        sorted(f"{n}/{s} extra" for (n, s) in B if (n, s) not in A)


def losses(run_dir: str, stage: str) -> list:
    with open(os.path.join(run_dir, stage, "log.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]  # training records (eval records have none)


def resumed_step(log_path: str, stage: str, since: int):
    with open(log_path) as f:
        f.seek(since)
        m = re.search(rf"resumed stage {stage} at step (\d+)", f.read())
    return int(m.group(1)) if m else None


def state_left(ckpt_dir: str) -> dict:
    """The newest complete checkpoint a fault left (None if none), and whether its checksums hold."""
    tag, skipped = manifest.choose(ckpt_dir)
    out = {"tag": tag, "skipped": [t for t, _ in skipped]}
    if tag is not None:
        out["step"] = manifest.manifest_of(ckpt_dir, tag)["step"]
        out["checksums_ok"] = manifest.problems(os.path.join(ckpt_dir, tag), deep=True) == []
    return out


# ---------------------------------------------------------------------------------- suites


def trial_faults(suite: str, n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        rank = rng.choice([0, 1, None])  # None: every rank dies at that point
        if suite == "save":
            point = ["save.file", "save.file", "save.before", "seal.checksummed", "seal.manifest", "save.after", "step"][i % 7]
            f = {"point": point, "step": rng.choice([2, 4, 6]) if point != "step" else rng.randint(1, 5)}
            if point == "save.file":
                f["n"] = 1 if rank != 0 else rng.choice([1, 2])  # rank 0 writes 2 files, rank 1 one
            if point == "seal.manifest":
                rank = 0  # only rank 0 writes the manifest
        elif suite == "transition":
            point = ["transition.regrown", "seal.checksummed", "seal.manifest", "transition.sealed", "save.file"][i % 5]
            f = {"point": point, "step": 0 if point != "save.file" else 2}
            if point == "save.file":
                f["n"] = 1
            if point == "seal.manifest":
                rank = 0
        else:
            point = ["seal.checksummed", "seal.manifest", "regrow.sealed"][i % 3]
            f = {"point": point, "step": 0}
            if point == "seal.manifest":
                rank = 0
        if rank is not None:
            f["rank"] = rank
        out.append(f)
    return out


def run_suite(suite: str, prefix: str, out: str, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    plan = plan_of(prefix)
    plan_path = os.path.join(out, "plan.yaml")
    import yaml

    with open(plan_path, "w") as f:
        yaml.safe_dump(plan.to_dict(), f)
    res = {"suite": suite, "trials": []}
    log = os.path.join(out, "ranks.log")
    # the uninterrupted reference
    ref = os.path.join(out, "ref")
    r = launch(train_fn(plan, 0, ref), None, log)
    assert r["codes"] == [0, 0], (r, open(log).read()[-3000:])
    if suite in ("transition",):
        r = launch(train_fn(plan, 1, ref), None, log)
        assert r["codes"] == [0, 0], (r, open(log).read()[-3000:])
    src_a = os.path.join(ref, "a", "checkpoints")
    if suite == "regrow":
        ref_out = os.path.join(out, "ref_regrow")
        r = launch(regrow_fn(src_a, plan_path, ref_out), None, log)
        assert r["codes"] == [0, 0], (r, open(log).read()[-3000:])
    for i, fault in enumerate(trial_faults(suite, n, rng)):
        run = os.path.join(out, f"t{i}")
        t = {"fault": fault}
        if suite == "save":
            stage, k, ckpt = "a", 0, os.path.join(run, "a", "checkpoints")
        elif suite == "transition":
            shutil.copytree(os.path.join(ref, "a"), os.path.join(run, "a"))  # stage a done: b starts with the transition
            stage, k, ckpt = "b", 1, os.path.join(run, "b", "checkpoints")
        if suite in ("save", "transition"):
            f = launch(train_fn(plan, k, run), fault, log)
            t["fault_codes"], t["peer_stop_s"] = f["codes"], f["peer_stop_s"]
            t["killed"] = any(c == -9 for c in f["codes"])
            left = state_left(ckpt)
            t["left"] = left
            since = os.path.getsize(log)
            again = launch(train_fn(plan, k, run), None, log)
            t["rerun_codes"] = again["codes"]
            t["resumed_at"] = resumed_step(log, stage, since)
            t["expected_resume"] = left.get("step") if left["tag"] is not None else None
            t["mismatched"] = same_state(os.path.join(ref, stage, "checkpoints"), ckpt) if again["codes"] == [0, 0] else ["rerun failed"]
            t["losses_equal"] = losses(ref, stage) == losses(run, stage)
        else:
            dst = os.path.join(run, "out")
            os.makedirs(run, exist_ok=True)
            f = launch(regrow_fn(src_a, plan_path, dst), fault, log)
            t["fault_codes"], t["peer_stop_s"] = f["codes"], f["peer_stop_s"]
            t["killed"] = any(c == -9 for c in f["codes"])
            t["left"] = {"out_exists": os.path.exists(dst), **(state_left(dst) if os.path.exists(dst) else {})}
            again = launch(regrow_fn(src_a, plan_path, dst), None, log)
            t["rerun_codes"] = again["codes"]
            ok = again["codes"] == [0, 0]
            t["mismatched"] = same_state(ref_out, dst) if ok else ["rerun failed"]
            t["sealed"] = ok and manifest.problems(os.path.join(dst, manifest.read_latest(dst)), deep=True) == []
        res["trials"].append(t)
        shutil.rmtree(run, ignore_errors=True)
    return res


if __name__ == "__main__":
    suite, prefix, out, n, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    t0 = time.time()
    result = run_suite(suite, prefix, out, n, seed)
    result["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
