#!/bin/bash
# Capacity-schedule sweep for the expert-choice model: one array task per schedule, all
# FLOP-matched to the same expected experts-per-token k, grouped in W&B as $SWEEP_NAME.
#   slurm/submit.sh slurm/capacity_sweep.sh
#   SWEEP_K=8 SWEEP_K_MIN=2 slurm/submit.sh --array=0,3 slurm/capacity_sweep.sh   # a subset
# Task i runs schedule SCHEDULES[i] as run ${SWEEP_NAME}-<schedule> (its own run directory
# and W&B run) with
#   moe.capacity.schedule=<schedule> moe.k=$SWEEP_K moe.capacity.k_target=$SWEEP_K
#   moe.capacity.k_min=$SWEEP_K_MIN moe.capacity.k_max=$SWEEP_K_MAX moe.capacity.flop_match=solve
#   wandb.group=$SWEEP_NAME
# flop_match=solve replaces k_max by the smallest value whose expected k over the diffusion
# times equals the target, so every schedule costs the same FLOPs as `static` (k_min = k_max = k).
# SWEEP_K_MAX is only the starting value the config validation sees (k_min <= k_max <= experts).
# Variables: SWEEP_NAME (default $SLURM_JOB_NAME-$SLURM_ARRAY_JOB_ID, stable across requeues),
# SWEEP_K (default 20), SWEEP_K_MIN (default 8), SWEEP_K_MAX (default 32, as in owt_ec.yaml), plus those of
# slurm/common.sh (CONFIG, DS_CONFIG, OVERRIDES, ...; RUN_NAME is set per schedule here).
#SBATCH --job-name=ecdlm-capsweep
#SBATCH --array=0-6
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue

CONFIG=${CONFIG:-configs/owt_ec.yaml}
source "${REPO:-$PWD}/slurm/common.sh" || { echo "[ecdlm-slurm] cannot source ${REPO:-$PWD}/slurm/common.sh: submit from the repo root or set REPO" >&2; exit 1; }

SCHEDULES=(static linear linear_reverse cosine cosine_reverse gaussian gaussian_reverse)
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || ecdlm_die "capacity_sweep.sh is an array job: submit it with --array (default 0-$(( ${#SCHEDULES[@]} - 1 )))"
SCHEDULE=${SCHEDULES[$SLURM_ARRAY_TASK_ID]:-}
[ -n "$SCHEDULE" ] || ecdlm_die "array task $SLURM_ARRAY_TASK_ID has no schedule (valid: 0-$(( ${#SCHEDULES[@]} - 1 )) = ${SCHEDULES[*]})"

SWEEP_NAME=${SWEEP_NAME:-${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID}}
SWEEP_K=${SWEEP_K:-20}          # the paper: schedules FLOP-matched to static k=20
SWEEP_K_MIN=${SWEEP_K_MIN:-8}
SWEEP_K_MAX=${SWEEP_K_MAX:-32}
if [ "$SCHEDULE" = static ]; then
  k_min=$SWEEP_K k_max=$SWEEP_K
else
  k_min=$SWEEP_K_MIN k_max=$SWEEP_K_MAX
fi
RUN_NAME=${SWEEP_NAME}-${SCHEDULE}
JOB_OVERRIDES="moe.capacity.schedule=$SCHEDULE moe.k=$SWEEP_K moe.capacity.k_target=$SWEEP_K"
JOB_OVERRIDES+=" moe.capacity.k_min=$k_min moe.capacity.k_max=$k_max moe.capacity.flop_match=solve"
JOB_OVERRIDES+=" wandb.group=$SWEEP_NAME"
ecdlm_log "sweep $SWEEP_NAME task $SLURM_ARRAY_TASK_ID: schedule=$SCHEDULE target k=$SWEEP_K (k_min=$k_min, k_max start=$k_max, flop_match=solve)"
ecdlm_train
