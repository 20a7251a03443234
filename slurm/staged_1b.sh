#!/usr/bin/env bash
# Staged training ~185M -> ~350M (depth x2) -> ~1.3B (width x2) on a GPU cluster:
# recipes/staged_1b.yaml, 4 nodes x 8 GPUs, bf16; every stage at its own layout (DP=32 ZeRO-1,
# DP=32 ZeRO-1, TP=2 x DP=16 ZeRO-2), each transition grown and resharded shard to shard.
#
#   sbatch slurm/staged_1b.sh                  # from the repository checkout
#   megagrow status runs/staged_1b             # what runs, what is done
#   sbatch --export=ALL,MEGAGROW_PLAN=recipes/baseline_1b.yaml slurm/staged_1b.sh   # the from-scratch baseline
#
# 10 minutes before the time limit Slurm sends SIGUSR1 to this script: the running stage saves
# at the next step, the job requeues itself and continues from that checkpoint (exit 75 in the
# log). A stage needing more nodes than this job has is submitted as a dependent job.
# Exit codes: 0 done, 2 bad input (nothing launched), 75 preempted and requeued, other: failure.
# Data: tools/prepare_data.py --out data_cache/pile32k --vocab-size 32000 --input ... (see the plan).
#
#SBATCH --job-name=megagrow-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

. "${MEGAGROW_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"
megagrow_job recipes/staged_1b.yaml
