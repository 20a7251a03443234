"""A run's progress, read from the files the trainer writes (checkpoints, status.json), the
decision of what to run next, and the manifest the controller keeps."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.paths import RunPaths

STATES = ("pending", "ready", "running", "growing", "preempted", "interrupted", "done", "failed")



def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def latest_tag(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            tag = f.read().strip()
    except OSError:
        return None
    return tag if tag and os.path.isdir(os.path.join(ckpt_dir, tag)) else None


@dataclass
class StageProgress:
    index: int
    name: str
    state: str  # one of STATES
    step: int
    steps: int
    tokens: int
    loss: Optional[float]
    layout: dict
    checkpoint: Optional[str]  # RUN-relative path of the tag `latest` names
    grow: Optional[str]
    partial: list = field(default_factory=list)  # leftovers of an interrupted transition (discarded before a launch)
    eval_loss: Optional[float] = None  # the latest eval loss in the stage's log.jsonl (None: no eval yet, or eval off)


def last_eval_loss(log_path: str) -> Optional[float]:
    """The eval_loss of the last eval record of a stage's log.jsonl."""
    last = None
    try:
        with open(log_path) as f:
            for line in f:
                if '"eval_loss"' in line:
                    try:
                        last = json.loads(line)["eval_loss"]
                    except (ValueError, KeyError):  # a torn last line
                        pass
    except OSError:
        return None
    return last


def read_progress(plan: Plan, run_dir: str) -> list[StageProgress]:
    """Each stage's state from its status.json and checkpoint directory (not from the manifest:
    the files the trainer writes are the truth, the manifest is a summary)."""
    out = []
    for k, stage in enumerate(plan.stages):
        sp = RunPaths(run_dir).stage(stage.name)
        ckpt = sp.ckpt
        tag = latest_tag(ckpt)
        st = read_json(sp.status) or {}
        partial = []
        if os.path.isdir(sp.partial):
            partial.append(sp.partial)
        if k > 0 and tag is None and os.path.isdir(ckpt):
            partial.append(ckpt)  # a later stage's checkpoint dir without `latest`: a half-written transition
        step = int(st.get("step", 0)) if tag else 0
        if tag is None:
            state = "pending"
        elif st.get("state") == "done" or step >= stage.steps or st.get("stopped_by"):
            state = "done"  # at its last step (saved as preempted there or not), or ended early by its stop rule
        elif st.get("state") == "preempted":
            state = "preempted"
        elif st.get("state") == "running":
            state = "interrupted"  # saved mid-stage; nothing tells that it still runs (the manifest may)
        else:
            state = "ready"  # a checkpoint without status: the transition wrote it, training has not saved yet
        L = stage.layout
        out.append(StageProgress(k, stage.name, state, step, stage.steps, step * L.global_batch * stage.model.seq_len,
                                 st.get("loss") if tag else None, L.to_dict(),
                                 RunPaths(run_dir).stage_rel(stage.name, "checkpoints", tag) if tag else None, stage.grow, partial,
                                 last_eval_loss(sp.log) if tag else None))
    return out


@dataclass(frozen=True)
class Action:
    """What to run next. kind: "done" | "train" (stage `stage`, from its checkpoint or from
    scratch) | "grow" (transition stage-1 -> stage, then train it)."""

    kind: str
    stage: int = -1
    resume_step: int = 0
    discard: tuple = ()  # half-written transition outputs to delete before the launch

    def describe(self, plan: Plan) -> str:
        if self.kind == "done":
            return "plan done"
        s = plan.stages[self.stage]
        if self.kind == "grow":
            prev = plan.stages[self.stage - 1]
            return f"grow {prev.name} -> {s.name} ({s.grow or 'identity'}), then train {s.name} 0/{s.steps}"
        if self.resume_step:
            return f"resume {s.name} at step {self.resume_step}/{s.steps}"
        return f"train {s.name} 0/{s.steps}"


def next_action(plan: Plan, progress: list[StageProgress]) -> Action:
    """The first stage that is not done decides. Progress in a later stage while an earlier
    one is unfinished is an inconsistent run directory (a UserError), never guessed at."""
    k = next((p.index for p in progress if p.state != "done"), None)
    if k is None:
        return Action("done")
    later = [p.name for p in progress[k + 1:] if p.checkpoint or p.state != "pending"]
    if later:
        raise UserError(f"run directory is inconsistent: stage {progress[k].name!r} is not finished but "
                        f"{', '.join(later)} already has a checkpoint")
    p = progress[k]
    if p.checkpoint is None:
        if k > 0:
            return Action("grow", k, 0, tuple(p.partial))
        return Action("train", 0, 0, tuple(p.partial))
    return Action("train", k, p.step, tuple(p.partial))


# --------------------------------------------------------------------------------------
# manifest


def read_manifest(run_dir: str) -> Optional[dict]:
    return read_json(RunPaths(run_dir).manifest)
