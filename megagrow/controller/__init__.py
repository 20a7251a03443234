"""The stage controller: `megagrow run PLAN` trains a whole plan, stage after stage, each at its
own layout, locally or under Slurm, and picks up where it stopped after any interruption.

    megagrow run PLAN [--run-dir RUN]       locally: one process per rank on this machine
    sbatch slurm/staged_1b.sh               under Slurm: srun per stage inside the allocation
    megagrow status RUN [--json]            what has run, what runs now, what is left

What it does, in a loop:
  1. validate the whole plan against the machine before launching anything: configs, the growth
     chain (each stage's `grow` operator really takes the previous model to this one), the
     dataset, every layout against the allocation (see `place`); a mistake is one `error:` line
     and exit 2;
  2. derive each stage's progress from its sealed checkpoints (status.json only says how its last
     launch ended); a disagreement between them is a named state (`torn`) and one line;
  3. decide what to run next (`next_action`): train stage k (resuming from its newest complete checkpoint), or
     grow stage k-1's final checkpoint into stage k (the trainer runs that transition itself at
     start-up, shard to shard, into a temporary directory renamed at the end), then train it;
  4. launch that stage with its layout: locally one process per rank (RANK/WORLD_SIZE, so each
     rank's exit code is visible), under Slurm `srun --nodes --ntasks` on the first hosts of the
     allocation (a retry on its other hosts first), MASTER_ADDR the first of them, MASTER_PORT a
     port free there (or a hash of job id, launch counter and uid when that host is not this one);
  5. write RUN/manifest.json (the plan, the current action, the launch counter, the events;
     written last and atomically; no stage's state: that is derived).

A stage that needs more nodes than the allocation has is not squeezed: the controller submits
the same batch script again as a dependent job (`sbatch --dependency=afterok:JOB --nodes=N`)
and exits 0; that job goes on from the manifest.

Signals: SIGUSR1/SIGTERM are forwarded to the running stage as SIGUSR1 (the ranks save at the
next step boundary and exit 75); the controller then exits 75 without starting anything new.
The batch script (slurm/env.sh) requeues the job on 75 after a signal; the restarted job runs
this same loop, which resumes from the checkpoints.

Exit codes: 0 the plan is done (or handed on to a dependent job), 2 bad input (nothing was
launched), 75 preempted (a stage saved; run again / requeue to resume), anything else a stage
failed (its ranks' exit code, 1 if none).

Modules: allocation (where a stage can run), validate (checks before any launch), progress
(progress from the run directory, the next action, the manifest reader), launch (the loop),
run (`megagrow run`), status (`megagrow status`).
"""

from megagrow.controller.allocation import Allocation, Placement, detect_allocation, place
from megagrow.controller.launch import Controller, launch_port, master_port
from megagrow.controller.progress import STATES, Action, StageProgress, next_action, read_manifest, read_progress
from megagrow.controller.run import lock_run_dir, run_main
from megagrow.controller.status import status_dict, status_main
from megagrow.controller.validate import check_run_dir, validate_plan

__all__ = [
    "Action",
    "Allocation",
    "Controller",
    "Placement",
    "STATES",
    "StageProgress",
    "check_run_dir",
    "detect_allocation",
    "launch_port",
    "lock_run_dir",
    "master_port",
    "next_action",
    "place",
    "read_manifest",
    "read_progress",
    "run_main",
    "status_dict",
    "status_main",
    "validate_plan",
]
