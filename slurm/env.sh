# slurm/env.sh - shared set-up of megagrow's sbatch scripts (sourced by them, not run).
#
# Sets up the environment on the job's first node, then `megagrow_job` runs the stage
# controller (`python -m megagrow.cli run`), which launches each stage with srun:
#
#   - SIGUSR1/SIGTERM to the batch shell (#SBATCH --signal=B:USR1@120 before the time limit,
#     or `scancel --batch --signal=USR1 JOB`): forwarded to the controller, which forwards it to
#     the running stage's srun; the ranks save at the next step boundary and exit 75; then
#     `scontrol requeue $SLURM_JOB_ID` and the restarted job (SLURM_RESTART_COUNT+1) goes on
#     from the checkpoints;
#   - a stage that needs more nodes than this job has: the controller submits this same script
#     as a dependent job (--dependency=afterok:$SLURM_JOB_ID --nodes=N) and this job ends with 0.
#
# Job exit codes: 0 plan done (or handed on), 2 bad input (nothing launched), 75 preempted and
# requeued, anything else a failure (not requeued; `megagrow status RUN` says where).
#
# Inputs (environment, all optional; sbatch --export=ALL,NAME=value,... or exported before sbatch):
#   MEGAGROW_HOME     repository checkout (default: the submission directory)
#   MEGAGROW_VENV     virtualenv to activate (default: $MEGAGROW_HOME/.venv if it exists)
#   MEGAGROW_PLAN     plan YAML                       (each script sets its own default)
#   MEGAGROW_RUN_DIR  run directory                   (default runs/<plan name>)
#   MEGAGROW_DATA     dataset prefix overriding the plan's
#   MEGAGROW_RUN_ARGS extra arguments for `megagrow run`
#   MEGAGROW_SBATCH_ARGS extra sbatch options for a dependent job (e.g. --output=..., --partition=...)
#   MEGAGROW_MAX_NODES most nodes a dependent job may ask for (default: the partition's node count)

MEGAGROW_HOME=${MEGAGROW_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$MEGAGROW_HOME" || { echo "error: MEGAGROW_HOME $MEGAGROW_HOME not found" >&2; exit 2; }
export MEGAGROW_HOME

if [ -z "${VIRTUAL_ENV:-}" ]; then
  _venv=${MEGAGROW_VENV:-$MEGAGROW_HOME/.venv}
  # shellcheck disable=SC1091
  [ -f "$_venv/bin/activate" ] && . "$_venv/bin/activate"
fi
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU nodes: one rank per GPU, NCCL over the fabric
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
else
  # CPU nodes (tests, demos): gloo, DeepSpeed's CPU accelerator, no JIT-built ops
  export DS_ACCELERATOR=cpu DS_BUILD_OPS=0
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# the batch script's own path (the job runs a spool copy of it): dependent jobs resubmit it
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MEGAGROW_SBATCH_SCRIPT:-}" ]; then
  MEGAGROW_SBATCH_SCRIPT=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
fi
export MEGAGROW_SBATCH_SCRIPT

# megagrow_job PLAN [megagrow run options...]: the controller, its signals, the requeue.
megagrow_job() {
  local plan=${MEGAGROW_PLAN:-$1}; shift
  local args=("$plan")
  [ -n "${MEGAGROW_RUN_DIR:-}" ] && args+=(--run-dir "$MEGAGROW_RUN_DIR")
  [ -n "${MEGAGROW_DATA:-}" ] && args+=(--data "$MEGAGROW_DATA")
  # shellcheck disable=SC2206
  args+=("$@" ${MEGAGROW_RUN_ARGS:-})
  echo "[megagrow job] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}" \
       "(${SLURM_JOB_NUM_NODES:-?} nodes, ${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-?}} tasks/node): megagrow run ${args[*]}"

  local got="" nsig=0 rc=0 r before pid=""
  # the controller forwards a signal to the running stage (as SIGUSR1): the ranks save, exit 75
  trap 'got=USR1; nsig=$((nsig + 1)); [ -n "$pid" ] && kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'got=TERM; nsig=$((nsig + 1)); [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM
  python -m megagrow.cli run "${args[@]}" &
  pid=$!
  [ -n "$got" ] && kill -USR1 "$pid" 2>/dev/null   # a signal that came before the controller started
  while :; do
    before=$nsig
    wait "$pid"; r=$?
    if [ "$r" -eq 127 ]; then break; fi          # already reaped: keep the last status
    rc=$r
    # a trapped signal interrupts `wait` (status >128) while the controller runs on: wait again
    # (for a controller that has exited meanwhile, the next wait returns its real status)
    if [ "$nsig" != "$before" ]; then continue; fi
    break
  done
  trap - USR1 TERM

  if [ "$rc" -eq 75 ] || { [ -n "$got" ] && { [ "$rc" -eq $((128 + 10)) ] || [ "$rc" -eq $((128 + 15)) ]; }; }; then
    # preempted after a clean save (or signalled before it launched anything): come back later
    echo "[megagrow job] preempted (signal ${got:-to the stage}, controller exit $rc): scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 75
  fi
  echo "[megagrow job] controller exit $rc"
  exit "$rc"
}
