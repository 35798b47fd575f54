#!/bin/bash
# ALBEF pretraining on the 4M-image corpus: 4 nodes x 8 GPUs (see docs/slurm.md).
#   export ALBEF_DATA_ROOT=/shared/albef/shards
#   sbatch slurm/pretrain_4m.sh [train.py args, e.g. --max_steps 1000 train.lr=2e-4]
# Any #SBATCH line can be overridden on the command line: sbatch --nodes=2 -p gpu --time=4:00:00 ...
# The --signal below (no "B:") sends USR1 to the training ranks 300 s before the time limit; they
# checkpoint and exit 124, and common.sh requeues the job, which resumes in the same run folder.
#SBATCH --job-name=albef-4m
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail
export ALBEF_CONFIG=${ALBEF_CONFIG:-albef_ds/configs/pretrain_4m.yaml}
# sbatch runs a copy of this file from its spool folder, so common.sh is found via the submit dir.
source "${ALBEF_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" "$@"
