#!/bin/bash
# SmolLM2-360M pretraining on Slurm: the published 4T-token single-stage run.
#
#   DATA_ROOT=/path/to/corpus sbatch slurm/smollm2_360m.sh
#
# The #SBATCH lines below are the published layout (16 nodes x 8 H100 = 128 GPUs, dp=128 [R]).
# Change the allocation with sbatch's own flags, which win over them
# (`sbatch --nodes=4 --time=12:00:00 --partition=p slurm/smollm2_360m.sh`), and everything else with
# environment variables: CONFIG, DATA_ROOT, RUN_DIR, CKPT_DIR, LOG_DIR, GPUS_PER_NODE,
# NPROC_PER_NODE, OVERRIDES, PYTHON, NANOTRONIX_DIR, MASTER_PORT (all documented, with their defaults, in
# slurm/common.sh). global_batch_size stays 768 sequences (gradient accumulation adapts) on node counts whose
# micro_batch_size x data-parallel size divides it (the preflight says so in one line otherwise).
# The job checkpoints every 2000 steps, saves and requeues itself on USR1 (sent 10 minutes before the time
# limit), and resumes from the latest checkpoint in CKPT_DIR, so one sbatch carries the run to its end.
# Output: %x-%j.out in the submission folder (appended across requeues); the run's metrics and checkpoints
# under RUN_DIR (default ./runs/smollm2-360m).
#
#SBATCH --job-name=smollm2-360m
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Find the checkout: sbatch runs a copy of this script from Slurm's spool folder, so its own path is useless.
if [ -z "${NANOTRONIX_DIR:-}" ]; then
  submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's/^ *Command=\(.*\.sh\)\( .*\)\{0,1\}$/\1/p' | head -n 1)
  for dir in "$(dirname "$(dirname "${submitted:-.}")")" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$(dirname "$0")")"; do
    if [ -n "$dir" ] && [ -f "$dir/slurm/common.sh" ]; then NANOTRONIX_DIR=$(cd "$dir" && pwd); break; fi
  done
fi
[ -f "${NANOTRONIX_DIR:-}/slurm/common.sh" ] \
  || { echo "error: cannot find the nanotronix checkout (slurm/common.sh): set NANOTRONIX_DIR" >&2; exit 2; }

RECIPE_CONFIG=$NANOTRONIX_DIR/examples/configs/smollm2_360m.yaml
RUN_NAME=smollm2-360m
source "$NANOTRONIX_DIR/slurm/common.sh"
