# shellcheck shell=bash
# Shared launcher for the ecdlm SLURM job scripts (pretrain_ec.sh, pretrain_tc.sh,
# capacity_sweep.sh). A job script sets its defaults, sources this file, optionally sets
# RUN_NAME / JOB_OVERRIDES, and calls `ecdlm_train`, which does not return.
#
# What it does, in the batch shell on the first node of the allocation:
#   1. cd to the repository root and source slurm/env.sh (site settings, venv, NCCL, W&B).
#   2. Rendezvous from SLURM: MASTER_ADDR = NodeAddr of the first node of the allocation,
#      MASTER_PORT = 20000 + (job id % 20000) (array tasks: array job id + task id).
#   3. `srun` one training process per task through slurm/task.sh, which exports
#      RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=<step tasks> (+ LOCAL_WORLD_SIZE,
#      NODE_RANK) and execs
#        $TRAIN_CMD --ds_config $DS_CONFIG --config $CONFIG train.run_name=$RUN_NAME \
#                   [train.output_dir=$RUNS_DIR/$RUN_NAME] [wandb.project=$WANDB_PROJECT] \
#                   $JOB_OVERRIDES $OVERRIDES
#   4. Acts on the trainer's exit status (srun returns the highest status of its tasks;
#      a task killed by signal N counts as 128+N):
#        0  finished                          -> exit 0
#        85 checkpointed after SIGUSR1        -> scontrol requeue (same job id) and exit 0
#        86 checkpointed after SIGTERM        -> exit 0 (clean stop, no requeue)
#        87 stopped on a non-finite loss or gradient (train.nonfinite) -> exit 87, no requeue
#                                                (a retry would diverge the same way)
#        88 watchdog: no step within train.hang_timeout_s (stacks in the log) -> requeue like a
#                                                failure (counts against MAX_REQUEUES)
#        89 a checkpoint save failed or was refused (disk full, I/O error, non-finite weights)
#                                             -> exit 89, no requeue (the next save would fail the same
#                                                way; the previous checkpoints are intact)
#        in NO_RETRY_STATUSES (default 2, the trainer's "bad configuration or input")
#                                             -> exit with that status, no requeue
#        other (failure)                      -> requeue while SLURM_RESTART_COUNT < MAX_REQUEUES,
#                                                else exit with that status
#
# Variables (all optional; sbatch passes the submit environment to the job, so
# `CONFIG=... OVERRIDES="a.b=1 c=2" sbatch slurm/pretrain_ec.sh` works):
#   CONFIG        model/training config (job scripts set their own default)
#   DS_CONFIG     DeepSpeed config                      (default ds_configs/zero2.json)
#   RUN_NAME      run name; the run directory is runs/$RUN_NAME (default $SLURM_JOB_NAME-$SLURM_JOB_ID).
#                 `scontrol requeue` keeps the job id, so a requeued job gets the same RUN_NAME
#                 and the trainer (train.resume=auto) resumes from runs/$RUN_NAME's newest
#                 complete checkpoint. A NEW sbatch gets a new id: pass RUN_NAME=<old name>
#                 to continue an earlier run from a new submission.
#   RUNS_DIR      when set, the run directory is $RUNS_DIR/$RUN_NAME (train.output_dir=...), e.g. a
#                 scratch file system; unset: the trainer's default runs/$RUN_NAME in the repo
#   OVERRIDES     extra dotted key=value trainer arguments, word-split (last one wins)
#   WANDB_PROJECT passed as wandb.project=$WANDB_PROJECT when set
#   TRAIN_CMD     the program that receives the trainer arguments (default `python train.py`);
#                 the tests replace it with a fake trainer. Word-split, run from the repo root.
#   SRUN_ARGS     extra srun options, word-split (e.g. "--label" or "--wait=300")
#   ECDLM_MASTER_PORT  force the rendezvous port
#   MAX_REQUEUES, NO_RETRY_STATUSES, VENV: see env.sh
#   REPO          where the job scripts look for slurm/common.sh (default: the job's working
#                 directory, i.e. the submit directory or --chdir); common.sh then sets REPO to
#                 its own parent directory and runs everything from there.

ECDLM_TAG="[ecdlm-slurm]"

ecdlm_log() {
  echo "$ECDLM_TAG $(date '+%Y-%m-%d %H:%M:%S') $*"
}

ecdlm_die() {
  ecdlm_log "ERROR: $*" >&2
  exit "${2:-1}"
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO
cd "$REPO" || ecdlm_die "cannot cd to repository root $REPO"

if [ -z "${SLURM_JOB_ID:-}" ]; then
  ecdlm_die "not inside a SLURM job (SLURM_JOB_ID unset): submit with sbatch, see slurm/README.md"
fi

# shellcheck source=slurm/env.sh
. "$REPO/slurm/env.sh" || ecdlm_die "sourcing $REPO/slurm/env.sh failed"

# ---- rendezvous -------------------------------------------------------------------------
# First node of the allocation, then its NodeAddr (what the other nodes can reach; equal to
# the name on most clusters, 127.0.0.1 on the test cluster whose node names are fake).
ecdlm_master_addr() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  [ -n "$first" ] || return 1
  addr=$(scontrol show node -o "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
  echo "${addr:-$first}"
}

ecdlm_master_port() {
  if [ -n "${ECDLM_MASTER_PORT:-}" ]; then
    echo "$ECDLM_MASTER_PORT"
  elif [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # concurrent tasks of one array differ by task id
    echo $(( 20000 + (SLURM_ARRAY_JOB_ID + SLURM_ARRAY_TASK_ID) % 20000 ))
  else
    echo $(( 20000 + SLURM_JOB_ID % 20000 ))
  fi
}

MASTER_ADDR=$(ecdlm_master_addr) || ecdlm_die "cannot find the first node of SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
MASTER_PORT=$(ecdlm_master_port)
export MASTER_ADDR MASTER_PORT

# ---- signals to the batch shell -----------------------------------------------------------
# `#SBATCH --signal=USR1@120` and `scancel --signal=USR1 JOB` signal the job STEPS (the
# training processes), not this shell. A USR1 reaching this shell anyway (`--signal=B:USR1`,
# `scancel --full/--batch`) must not kill it, or nobody would act on the trainer's status; a
# TERM (scancel, time limit) must not stop it from waiting for the trainer's checkpoint either.
# Both are recorded and logged; the steps get the signal from SLURM directly.
ECDLM_SIGNALS=""
ecdlm_on_signal() {
  ECDLM_SIGNALS="$ECDLM_SIGNALS $1"
  ecdlm_log "batch shell received SIG$1 (recorded; the training processes are signalled by SLURM directly)"
}
trap 'ecdlm_on_signal USR1' USR1
trap 'ecdlm_on_signal TERM' TERM

# ---- launch and act on the result ------------------------------------------------------------
ecdlm_requeue() {  # $1: reason
  ecdlm_log "requeueing job $SLURM_JOB_ID ($1); it keeps RUN_NAME=$RUN_NAME and resumes from its checkpoint"
  if scontrol requeue "$SLURM_JOB_ID"; then
    # SLURM usually kills this shell while requeueing; if not, we are done anyway.
    exit 0
  fi
  ecdlm_log "ERROR: scontrol requeue $SLURM_JOB_ID failed (job submitted with --no-requeue, or JobRequeue disabled?)"
  return 1
}

ecdlm_train() {
  CONFIG=${CONFIG:?CONFIG must be set by the job script or the environment}
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
  RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
  TRAIN_CMD=${TRAIN_CMD:-python train.py}
  export CONFIG DS_CONFIG RUN_NAME

  local restarts=${SLURM_RESTART_COUNT:-0}
  local -a train_args=(--ds_config "$DS_CONFIG" --config "$CONFIG" "train.run_name=$RUN_NAME")
  [ -n "${RUNS_DIR:-}" ] && train_args+=("train.output_dir=$RUNS_DIR/$RUN_NAME")
  [ -n "${WANDB_PROJECT:-}" ] && train_args+=("wandb.project=$WANDB_PROJECT")
  # shellcheck disable=SC2206  # word splitting of the override lists is intended
  train_args+=(${JOB_OVERRIDES:-} ${OVERRIDES:-})

  local -a srun_args=()
  # SLURM >= 22.05: srun no longer inherits sbatch's --cpus-per-task; pass it on explicitly.
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  # shellcheck disable=SC2206
  srun_args+=(${SRUN_ARGS:-})
  # shellcheck disable=SC2206
  local -a train_cmd=($TRAIN_CMD)

  ecdlm_log "job $SLURM_JOB_ID${SLURM_ARRAY_JOB_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
    "name=$SLURM_JOB_NAME restart_count=$restarts max_requeues=$MAX_REQUEUES"
  ecdlm_log "nodes=$SLURM_JOB_NODELIST ntasks=${SLURM_NTASKS:-?} cpus_per_task=${SLURM_CPUS_PER_TASK:-default}" \
    "gpus_per_node=${SLURM_GPUS_PER_NODE:-none} host=$(hostname)"
  ecdlm_log "rendezvous MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT; repo=$REPO python=$(command -v python || echo none)"
  ecdlm_log "run_name=$RUN_NAME config=$CONFIG ds_config=$DS_CONFIG"
  ecdlm_log "launch: srun ${srun_args[*]} slurm/task.sh ${train_cmd[*]} ${train_args[*]}"

  # srun in the background + wait, so a trapped signal is handled while training runs
  # (`wait` returns early on a trapped signal; wait again until srun has really ended).
  srun "${srun_args[@]}" "$REPO/slurm/task.sh" "${train_cmd[@]}" "${train_args[@]}" &
  local srun_pid=$! rc
  while :; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  ecdlm_log "srun finished with status $rc${ECDLM_SIGNALS:+ (batch shell saw:$ECDLM_SIGNALS)}"

  case $rc in
    0)
      ecdlm_log "training finished (status 0)"
      exit 0 ;;
    85)
      ecdlm_log "status 85: checkpointed after SIGUSR1, asking for a requeue (restart count $restarts)"
      ecdlm_requeue "checkpointed after SIGUSR1" || exit 85 ;;
    86)
      ecdlm_log "status 86: checkpointed after SIGTERM, stopping cleanly without requeue"
      exit 0 ;;
    87)
      ecdlm_log "status 87: training diverged (non-finite loss or gradient; the step and value are in the" \
        "log); not requeueing: a retry from the same checkpoint would diverge again (lower optim.lr)"
      exit 87 ;;
    88)
      if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
        ecdlm_log "status 88: hang (no step within train.hang_timeout_s; every live rank's stack is in the" \
          "log); requeue $((restarts + 1)) of at most $MAX_REQUEUES, resuming from the newest complete checkpoint"
        ecdlm_requeue "hang, status 88" || exit 88
      fi
      ecdlm_log "status 88: hang; requeue limit reached (MAX_REQUEUES=$MAX_REQUEUES), exiting with status 88"
      exit 88 ;;
    89)
      ecdlm_log "status 89: a checkpoint save failed or was refused (the trainer's last error line says" \
        "why: path, OS error, free space); not requeueing; the previous checkpoints are intact"
      exit 89 ;;
    *)
      if [[ " $NO_RETRY_STATUSES " == *" $rc "* ]]; then
        ecdlm_log "training FAILED with status $rc, listed in NO_RETRY_STATUSES='$NO_RETRY_STATUSES'" \
          "(2 = bad configuration or input: retrying cannot help); not requeueing; exiting with status $rc"
        exit "$rc"
      fi
      if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
        ecdlm_log "training FAILED with status $rc; requeue $((restarts + 1)) of at most $MAX_REQUEUES" \
          "(restart count $restarts < MAX_REQUEUES=$MAX_REQUEUES)"
        ecdlm_requeue "failure, status $rc" || exit "$rc"
      fi
      ecdlm_log "training FAILED with status $rc; requeue limit reached (restart count $restarts >=" \
        "MAX_REQUEUES=$MAX_REQUEUES), not requeueing; exiting with status $rc"
      exit "$rc" ;;
  esac
}
