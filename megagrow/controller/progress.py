"""A run's progress, read from the files the trainer writes (checkpoints, status.json), the
decision of what to run next, and the manifest the controller keeps."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.fsutil import read_json
from megagrow.paths import RunPaths

STATES = ("pending", "ready", "running", "growing", "preempted", "interrupted", "done", "failed")



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
    """Each stage's progress from its newest complete checkpoint (its manifest: step, final step),
    not from status.json, which only labels how the last launch ended (preempted, running, failed).
    A checkpoint that was never completed (no manifest, a file missing or short) does not count."""
    from megagrow.state.manifest import choose, manifest_of

    out = []
    for k, stage in enumerate(plan.stages):
        sp = RunPaths(run_dir).stage(stage.name)
        ckpt = sp.ckpt
        tag = choose(ckpt)[0] if os.path.isdir(ckpt) else None
        m = (manifest_of(ckpt, tag) or {}) if tag else {}
        st = read_json(sp.status) or {}
        if not isinstance(st, dict):
            st = {}
        partial = []
        if os.path.isdir(sp.partial):
            partial.append(sp.partial)
        if k > 0 and tag is None and os.path.isdir(ckpt):
            partial.append(ckpt)  # a later stage's checkpoint dir without a complete tag: a half-written transition
        step = int(m.get("step", 0)) if tag else 0
        final = m.get("final_step")
        at_status = st.get("step") == step
        if tag is None:
            state = "pending"
        elif m.get("finished") or step >= stage.steps or (final is not None and step >= final):
            state = "done"  # at its last step, or ended early by its stop rule
        elif at_status and st.get("state") == "preempted":
            state = "preempted"
        elif st.get("state") in ("running", "failed", "preempted"):
            state = "interrupted"  # saved mid-stage; nothing tells that it still runs (the manifest may)
        else:
            state = "ready"  # a checkpoint without status: the transition wrote it, training has not saved yet
        L = stage.layout
        out.append(StageProgress(k, stage.name, state, step, stage.steps, step * L.global_batch * stage.model.seq_len,
                                 st.get("loss") if tag and at_status else None, L.to_dict(),
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
    """The run's manifest, or None if there is none; one that is not a JSON object (or not ours) is
    a UserError naming it, never a traceback."""
    path = RunPaths(run_dir).manifest
    if not os.path.exists(path):
        return None
    m = read_json(path)
    if not isinstance(m, dict) or not isinstance(m.get("plan"), dict):
        what = "not valid JSON" if m is None else f"a JSON {type(m).__name__}, not a run manifest object"
        raise UserError(f"{path} is {what}; move it aside (the checkpoints and status files are the truth: "
                        f"`megagrow run` writes a new one)")
    return m
