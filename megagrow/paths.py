"""Where a run keeps its files: every path of a run directory is computed here, once.

    RUN/manifest.json                  the controller's summary of the run (written last, atomically)
    RUN/.controller.lock               held by the one `megagrow run` working on RUN
    RUN/<stage>/checkpoints/           native DeepSpeed checkpoints: tags step_NNNNNNNN, `latest`
    RUN/<stage>/checkpoints.partial/   a transition's output until it is complete (then renamed)
    RUN/<stage>/log.jsonl              one JSON object per logged step (rank 0)
    RUN/<stage>/status.json            running / preempted / done, step, tag (written atomically)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
TAG_PREFIX = "step_"


def tag_of(step: int) -> str:
    """The checkpoint tag of a step: step_00000050."""
    return f"{TAG_PREFIX}{step:08d}"


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

    def has_checkpoint(self) -> bool:
        return os.path.isfile(os.path.join(self.ckpt, "latest"))


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

    def stage_rel(self, name: str, *parts: str) -> str:
        """A path inside stage `name`, relative to the run directory (as the manifest records it)."""
        return os.path.join(name, *parts)
