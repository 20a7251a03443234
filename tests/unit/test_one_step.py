"""The training step exists once (megagrow/train/step.py train_step): the trainer runs it and
`megagrow bench` times it, so a benchmark measures what trains. Only the plain-PyTorch comparison loop
(its own optimizer, loss.backward) stays beside it. The benchmark library is megagrow/bench/; the
top-level bench/ holds runnable scripts only, none with a step or timing loop of its own."""

from __future__ import annotations

import ast
import os

from conftest import REPO

STEP = os.path.join("megagrow", "train", "step.py")


def _engine_steps(path: str) -> list[str]:
    """'line: call' for each engine.backward(...) / engine.step() call: the body of a DeepSpeed step."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("backward", "step"):
            base = ast.unparse(node.func.value)
            if base.split(".")[-1] in ("engine", "eng"):
                out.append(f"{node.lineno}: {ast.unparse(node.func)}")
    return out


def test_only_train_step_drives_the_engine():
    """No module of megagrow/, bench/ or tools/ but megagrow/train/step.py calls engine.backward or
    engine.step: a second copy of the step (one a benchmark would time instead of the trainer's) fails here."""
    bad = []
    for top in ("megagrow", "bench", "tools"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith(".py") and os.path.relpath(path, REPO) != STEP:
                    bad += [f"{os.path.relpath(path, REPO)}:{b}" for b in _engine_steps(path)]
    assert bad == [], "call megagrow.train.step.train_step instead: " + ", ".join(bad)
    assert _engine_steps(os.path.join(REPO, STEP)), "train_step no longer drives the engine"


def test_the_trainer_and_the_benchmarks_call_train_step():
    """The trainer, `megagrow bench`'s timed loop and its transition benchmark all call train_step."""
    for rel in ("megagrow/train/loop.py", "megagrow/bench/loops.py", "megagrow/bench/transition.py"):
        calls = {ast.unparse(n.func) for n in ast.walk(ast.parse(open(os.path.join(REPO, rel)).read())) if isinstance(n, ast.Call)}
        assert "train_step" in calls, rel


def test_top_level_bench_scripts_time_no_steps_of_their_own():
    """No script under bench/ (Python, or Python inside a shell script) runs training steps itself (a
    .backward(), an engine.step(), a torch optimizer, the trainer's or the benchmark's step loops): step
    timing lives in megagrow/bench/ (`megagrow bench`), which the scripts call. (Building an engine to
    time a load, as bench/resume_rss.py does, is no step.)"""
    bad = []
    for root, _, files in os.walk(os.path.join(REPO, "bench")):
        for f in files:
            if f.endswith((".py", ".sh")):
                text = open(os.path.join(root, f)).read()
                for needle in (".backward(", ".step()", "torch.optim.", "train_step", "PlainDDPLoop", "MegagrowLoop"):
                    if needle in text:
                        bad.append(f"{os.path.relpath(os.path.join(root, f), REPO)}: {needle}")
    assert bad == [], bad
