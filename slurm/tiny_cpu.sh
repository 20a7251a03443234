#!/usr/bin/env bash
# The tiny plan on CPU nodes under Slurm (what tests/slurm/ submits; a demo of the cluster
# workflow without GPUs): each stage runs with srun at its own layout, 2 ranks per node.
#
#   sbatch slurm/tiny_cpu.sh                                    # recipes/tiny.yaml -> runs/tiny
#   sbatch --export=ALL,MEGAGROW_PLAN=recipes/tiny_test.yaml,MEGAGROW_DATA=/path/corpus slurm/tiny_cpu.sh
#   megagrow status runs/tiny
#
#SBATCH --job-name=megagrow-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=30
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a copy of this file: find the checkout through the submission directory
. "${MEGAGROW_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh"
megagrow_job recipes/tiny.yaml
