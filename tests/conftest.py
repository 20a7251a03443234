"""Shared fixtures: a small real-text dataset (stdlib sources, tiny tokenizer) and launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# transformers (the hf extra) must never reach the network in tests: every model is built locally
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _env() -> dict:
    env = dict(os.environ)
    # a test that set up torch.distributed in this process leaves its rendezvous behind: a child
    # must pick its own (megagrow takes a free port when MASTER_PORT is unset)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"  # several ranks share 2 cores
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="session")
def data_prefix(tmp_path_factory) -> str:
    """A real-text token dataset: a few stdlib modules, a 512-token sentencepiece model, and a
    validation split PREFIX.valid of two other modules."""
    import sysconfig

    out = tmp_path_factory.mktemp("data") / "corpus"
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, f) for f in ("argparse.py", "dataclasses.py", "json/decoder.py", "textwrap.py")]
    cmd = [sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), "--out", str(out), "--vocab-size", "512", "--json"]
    for f in files:
        cmd += ["--input", f]
    r = subprocess.run(cmd + ["--valid-fraction", "0"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tokens"] > 50_000
    # the validation split: other stdlib modules, same tokenizer, written as PREFIX.valid
    valid = [
        sys.executable,
        os.path.join(REPO, "tools", "prepare_data.py"),
        "--out",
        f"{out}.valid",
        "--tokenizer",
        f"{out}.model",
        "--valid-fraction",
        "0",
        "--json",
        "--no-progress",
    ]
    for f in ("string.py", "json/encoder.py"):
        valid += ["--input", os.path.join(stdlib, f)]
    r = subprocess.run(valid, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return str(out)


def torchrun(nproc: int, args: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=127.0.0.1:0",
        "--max_restarts=0",
    ] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=REPO, **kw)


def run_worker(nproc: int, scenario: str, data: str, out) -> dict:
    # a scenario groups many cases in one launch (the growth one: 13 operator/layout cases, each
    # trained, grown, evaluated and resumed), so it gets a generous wall-clock limit
    r = torchrun(nproc, [os.path.join(REPO, "tests", "dist", "worker.py"), scenario, data, str(out)], timeout=1800)
    assert r.returncode == 0, f"worker {scenario} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def spawn_ranks(nproc: int, args: list[str], slurm_env: bool = True) -> list[subprocess.Popen]:
    """Start `nproc` ranks directly, as srun does (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), so
    each rank's own exit code is visible (torchrun's agent turns any failure into 1)."""
    from megagrow.parallel.groups import free_port

    port = str(free_port())
    procs = []
    for r in range(nproc):
        env = _env()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if slurm_env:
            env.update(SLURM_PROCID=str(r), SLURM_NTASKS=str(nproc), SLURM_LOCALID=str(r))
        else:
            env.update(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "megagrow.cli"] + args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def pytest_addoption(parser):
    parser.addoption(
        "--cases",
        type=int,
        default=None,
        help="R1 reshard property test: number of random (model, layout A, layout B, dtype) cases "
        "(default 200, or MEGAGROW_R1_CASES; `make stress` runs 600)",
    )
    parser.addoption(
        "--trials",
        type=int,
        default=None,
        help="fault-injection tests: kill trials per test (default: the test's own, or MEGAGROW_FAULT_TRIALS)",
    )


_FOLDER_MARKS = {"dist": "dist", "slurm": "slurm"}


def pytest_collection_modifyitems(config, items):
    """Mark each test by its folder: tests/dist/ -> `dist`, tests/slurm/ -> `slurm`, so that
    `pytest -m "not slurm"` or `-m "not dist and not slurm"` selects a quicker subset. `make test`
    selects nothing out: it runs every test."""
    for item in items:
        parts = os.path.relpath(str(item.fspath), os.path.join(REPO, "tests")).split(os.sep)
        mark = _FOLDER_MARKS.get(parts[0]) if len(parts) > 1 else None
        if mark:
            item.add_marker(getattr(pytest.mark, mark))
