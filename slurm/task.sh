#!/usr/bin/env bash
# Per-task wrapper, started by `srun` from slurm/common.sh once per task (= per GPU):
# exports torch.distributed's env:// variables from SLURM's, then execs the trainer
# (exec: no extra process stays around to swallow the signals SLURM sends to the step).
# MASTER_ADDR / MASTER_PORT come from the batch shell's environment (common.sh).
set -eu

: "${SLURM_PROCID:?task.sh must run under srun}"
export RANK=$SLURM_PROCID
export LOCAL_RANK=$SLURM_LOCALID
export WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}
export NODE_RANK=${SLURM_NODEID:-0}

# Tasks on this node: SLURM_STEP_TASKS_PER_NODE is e.g. "8(x2)" or "2,1"; pick this node's entry.
ecdlm_local_world_size() {
  local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}} node=${SLURM_NODEID:-0} item count reps
  local -a items
  IFS=, read -r -a items <<<"$spec"
  for item in "${items[@]}"; do
    count=${item%%(*}
    reps=1
    [[ $item == *"(x"* ]] && { reps=${item#*(x}; reps=${reps%)}; }
    if [ "$node" -lt "$reps" ]; then echo "$count"; return; fi
    node=$((node - reps))
  done
}
LOCAL_WORLD_SIZE=$(ecdlm_local_world_size)
[ -n "$LOCAL_WORLD_SIZE" ] && export LOCAL_WORLD_SIZE

: "${MASTER_ADDR:?MASTER_ADDR not set (launch through slurm/common.sh)}"
: "${MASTER_PORT:?MASTER_PORT not set (launch through slurm/common.sh)}"
exec "$@"
