#!/bin/bash
# Pretrain the expert-choice (EC) masked-diffusion MoE model on OpenWebText.
#   slurm/submit.sh slurm/pretrain_ec.sh                 # from the repo root (creates logs/)
#   OVERRIDES="train.max_steps=1000" slurm/submit.sh --nodes=4 slurm/pretrain_ec.sh
#   CPU-only nodes: slurm/submit.sh --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1 slurm/pretrain_ec.sh
# Every #SBATCH line below is a default; sbatch command-line options override it.
# Variables: see slurm/common.sh and slurm/README.md.
#SBATCH --job-name=ecdlm-ec
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue

CONFIG=${CONFIG:-configs/owt_ec.yaml}
# The batch script runs from a copy in SLURM's spool directory, in the submit directory
# (or --chdir): find the repository from there, or from $REPO.
source "${REPO:-$PWD}/slurm/common.sh" || { echo "[ecdlm-slurm] cannot source ${REPO:-$PWD}/slurm/common.sh: submit from the repo root or set REPO" >&2; exit 1; }
ecdlm_train
