"""Where a run keeps its files: every path of a run directory is computed here, once.

    RUN/manifest.json                  the controller's summary of the run (written last, atomically)
    RUN/.controller.lock               held by the one `megagrow run` working on RUN
    RUN/<stage>/checkpoints/           native DeepSpeed checkpoints: tags step_NNNNNNNN, `latest`
    RUN/<stage>/checkpoints.partial/   a transition's output until it is complete (then renamed)
    RUN/<stage>/log.jsonl              one JSON object per logged step (rank 0)
    RUN/<stage>/status.json            running / preempted / done, step, tag (written atomically)
    RUN/<stage>/heartbeat              touched by rank 0 as the stage makes progress
    RUN/<stage>/.stage.lock            held by rank 0 of the one set of ranks training the stage

A run directory defaults to runs/<plan name> (`default_run_dir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MANIFEST = "manifest.json"
LATEST = "latest"  # DeepSpeed's pointer file in a checkpoint directory: the name of a tag
PARTIAL_SUFFIX = ".partial"
TAG_PREFIX = "step_"


def tag_of(step: int) -> str:
    """The checkpoint tag of a step: step_00000050."""
    return f"{TAG_PREFIX}{step:08d}"


def default_run_dir(plan_name: str) -> str:
    """The run directory of a plan when none is given: runs/<plan name> (relative to the cwd)."""
    return os.path.join("runs", plan_name)


@dataclass(frozen=True)
class StagePaths:
    root: str

    @property
    def ckpt(self) -> str:
        return os.path.join(self.root, "checkpoints")

    @property
    def partial(self) -> str:
        return self.ckpt + PARTIAL_SUFFIX

    @property
    def log(self) -> str:
        return os.path.join(self.root, "log.jsonl")

    @property
    def status(self) -> str:
        return os.path.join(self.root, "status.json")

    @property
    def heartbeat(self) -> str:
        """Touched by rank 0 as the stage makes progress; its age is how long the stage has not."""
        return os.path.join(self.root, "heartbeat")

    @property
    def lock(self) -> str:
        """flock'ed by rank 0 while a set of ranks trains the stage."""
        return os.path.join(self.root, ".stage.lock")


@dataclass(frozen=True)
class RunPaths:
    root: str

    @property
    def manifest(self) -> str:
        return os.path.join(self.root, MANIFEST)

    @property
    def controller_lock(self) -> str:
        return os.path.join(self.root, ".controller.lock")

    def stage(self, name: str) -> StagePaths:
        return StagePaths(os.path.join(self.root, name))

    def tag_rel(self, name: str, tag: str) -> str:
        """Checkpoint `tag` of stage `name`, relative to the run directory (as the manifest records it)."""
        return os.path.join(StagePaths(name).ckpt, tag)
