"""A run's progress, derived from the sealed checkpoints each stage holds, the decision of what to
run next, and the manifest the controller keeps.

One record: a stage's step and whether it is finished come from its newest complete (sealed)
checkpoint alone. status.json only says how the stage's last launch ended (running, preempted,
failed, done) and at which step it last saved; RUN/manifest.json only what the controller is
doing (the current action, its events, the launch counter). Where they disagree with the
checkpoints, the stage gets a named state and a one-line `note` (shown by `megagrow status` and
`megagrow run`), never a silent guess:

    torn   status.json (or `latest`) names a save that is no longer complete (a file truncated,
           missing or removed after it was sealed): the stage goes on from its newest complete
           checkpoint, or from the start when none is left, and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megagrow.config import Plan
from megagrow.errors import UserError
from megagrow.fsutil import read_json, read_records
from megagrow.paths import RunPaths

STATES = ("pending", "ready", "running", "growing", "preempted", "interrupted", "torn", "done", "failed")


@dataclass
class StageProgress:
    index: int
    name: str
    state: str  # one of STATES
    step: int
    steps: int
    tokens: int
    loss: float | None
    layout: dict
    checkpoint: str | None  # RUN-relative path of the newest complete tag
    grow: str | None
    partial: list = field(default_factory=list)  # leftovers of an interrupted transition (discarded before a launch)
    eval_loss: float | None = None  # the latest eval loss in the stage's log.jsonl (None: no eval yet, or eval off)
    note: str | None = None  # one line naming a disagreement between the stage's records (state "torn")


def last_eval_loss(log_path: str) -> float | None:
    """The eval_loss of the last eval record of a stage's log.jsonl."""
    evals = [r["eval_loss"] for r in read_records(log_path) if "eval_loss" in r]
    return evals[-1] if evals else None


def read_progress(plan: Plan, run_dir: str) -> list[StageProgress]:
    """Each stage's progress from its newest complete checkpoint (its manifest: step, final step),
    not from status.json, which only labels how the last launch ended (preempted, running, failed).
    A checkpoint that was never completed (no manifest, a file missing or short) does not count.
    A save that status.json (or `latest`) names but that is not complete any more makes the stage
    "torn", with a note saying why and where it goes on from."""
    from megagrow.state.manifest import choose, manifest_of, read_latest

    out = []
    for k, stage in enumerate(plan.stages):
        sp = RunPaths(run_dir).stage(stage.name)
        ckpt = sp.ckpt
        # status.json and `latest` first: both are written after their save was sealed, so a save
        # sealed while this runs is never taken for a torn one
        st = read_json(sp.status) or {}
        if not isinstance(st, dict):
            st = {}
        latest = read_latest(ckpt)
        tag, skipped = choose(ckpt) if os.path.isdir(ckpt) else (None, [])
        m = (manifest_of(ckpt, tag) or {}) if tag else {}
        partial = []
        if os.path.isdir(sp.partial):
            partial.append(sp.partial)
        if k > 0 and tag is None and os.path.isdir(ckpt):
            partial.append(ckpt)  # a later stage's checkpoint dir without a complete tag: a half-written transition
        step = int(m.get("step", 0)) if tag else 0
        final = m.get("final_step")
        at_status = st.get("step") == step
        torn = _torn(k, stage, ckpt, tag, step, skipped, st, latest)
        if torn:
            state = "torn"
        elif tag is None:
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
        out.append(
            StageProgress(
                k,
                stage.name,
                state,
                step,
                stage.steps,
                step * L.global_batch * stage.model.seq_len,
                st.get("loss") if tag and at_status else None,
                L.to_dict(),
                RunPaths(run_dir).tag_rel(stage.name, tag) if tag else None,
                stage.grow,
                partial,
                last_eval_loss(sp.log) if tag else None,
                torn,
            )
        )
    return out


def _torn(k: int, stage, ckpt: str, tag: str | None, step: int, skipped: list, st: dict, latest: str | None) -> str | None:
    """The note of a torn stage, or None. status.json is written only after a save is sealed, and
    `latest` moved only then: a step either one names past the newest complete checkpoint is a
    sealed save that has since been damaged or removed."""
    from megagrow.paths import tag_of

    why = dict(skipped)
    claimed = st.get("step")
    have = step if tag else -1
    if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed > have:
        t = tag_of(claimed)
        what = (
            f"is incomplete ({why[t]})"
            if t in why
            else f"is gone from {ckpt}"
            if not os.path.isdir(os.path.join(ckpt, t))
            else "is incomplete"
        )
        head = f"status.json says {st.get('state', 'saved')} at step {claimed}, but checkpoint {t} {what}"
    elif latest and latest != tag and latest in why and _tag_step(latest) > have:
        head = f"`latest` names {latest}, but it is incomplete ({why[latest]})"
    else:
        return None
    if tag:
        return f"{head}; goes on from the newest complete checkpoint {tag} (step {step}/{stage.steps})"
    if k > 0:
        return f"{head}; no complete checkpoint is left: grows it again from the previous stage"
    return f"{head}; no complete checkpoint is left: trains it again from step 0"


def _tag_step(tag: str) -> int:
    digits = "".join(c for c in tag if c.isdigit())
    return int(digits) if digits else -1


@dataclass(frozen=True)
class Action:
    """What to run next. kind: "done" | "train" (stage `stage`, from its checkpoint or from
    scratch) | "grow" (transition stage-1 -> stage, then train it)."""

    kind: str
    stage: int = -1
    resume_step: int = 0
    discard: tuple = ()  # half-written transition outputs to delete before the launch
    note: str | None = None  # the stage's note (a torn stage: why, and where it goes on from)

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
    one is unfinished is an inconsistent run directory (a UserError), never guessed at; a torn
    stage that a later stage has already grown from is not needed any more (its note stays)."""

    def started(p):
        return p.checkpoint is not None or p.state not in ("pending", "torn")

    k = next(
        (p.index for p in progress if p.state != "done" and not (p.state == "torn" and any(started(q) for q in progress[p.index + 1 :]))),
        None,
    )
    if k is None:
        return Action("done")
    later = [p.name for p in progress[k + 1 :] if started(p)]
    if later:
        raise UserError(
            f"run directory is inconsistent: stage {progress[k].name!r} is not finished but {', '.join(later)} already has a checkpoint"
        )
    p = progress[k]
    if p.checkpoint is None:
        if k > 0:
            return Action("grow", k, 0, tuple(p.partial), p.note)
        return Action("train", 0, 0, tuple(p.partial), p.note)
    return Action("train", k, p.step, tuple(p.partial), p.note)


# --------------------------------------------------------------------------------------
# manifest


def read_manifest(run_dir: str) -> dict | None:
    """The run's manifest, or None if there is none; one that is not a JSON object (or not ours) is
    a UserError naming it, never a traceback."""
    path = RunPaths(run_dir).manifest
    if not os.path.exists(path):
        return None
    m = read_json(path)
    if not isinstance(m, dict) or not isinstance(m.get("plan"), dict):
        what = "not valid JSON" if m is None else f"a JSON {type(m).__name__}, not a run manifest object"
        raise UserError(
            f"{path} is {what}; move it aside (the checkpoints and status files are the truth: `megagrow run` writes a new one)"
        )
    return m
