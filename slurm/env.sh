# shellcheck shell=bash
# Site settings for ecdlm SLURM jobs: the ONE place to adapt the scripts to a cluster.
#
# Sourced by slurm/common.sh in the batch shell (on the first node of the allocation)
# before anything is launched; `srun` passes the batch shell's environment on to every
# training task, so whatever is exported here reaches all ranks on all nodes.
# Every setting below keeps a value already present in the environment (e.g. given on the
# sbatch command line as `VENV=/x sbatch ...`, since sbatch exports the submit environment).
# $REPO is the repository root (set by common.sh).

# ---- modules (examples; uncomment what your site needs) -------------------------------
# module purge
# module load cuda/12.4 nccl/2.21 gcc/12

# ---- Python environment ----------------------------------------------------------------
# VENV: virtual environment to activate; default $REPO/.venv when it exists.
# Set VENV=none to use whatever `python` is on PATH (e.g. a conda env activated above).
if [ "${VENV:-}" != none ]; then
  _ecdlm_venv=${VENV:-$REPO/.venv}
  if [ -f "$_ecdlm_venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$_ecdlm_venv/bin/activate"
  elif [ -n "${VENV:-}" ]; then
    echo "[ecdlm-slurm] ERROR: VENV=$VENV has no bin/activate" >&2
    return 1
  fi
  unset _ecdlm_venv
fi

# ---- NCCL / networking (examples) ---------------------------------------------------------
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL's bootstrap/socket traffic
# export GLOO_SOCKET_IFNAME=ib0          # same for gloo (used for CPU-side collectives)
# export NCCL_IB_HCA=mlx5_0,mlx5_1       # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3             # RoCE clusters
# export NCCL_DEBUG=WARN                 # INFO when debugging hangs
# export NCCL_ASYNC_ERROR_HANDLING=1     # abort (not hang) when a peer dies
# export TORCH_NCCL_BLOCKING_WAIT=0

# ---- Weights & Biases ------------------------------------------------------------------------
# WANDB_PROJECT is passed to the trainer as wandb.project=...; the others are read by wandb.
# export WANDB_PROJECT=ecdlm
# export WANDB_ENTITY=my-team
# export WANDB_MODE=offline              # compute nodes without internet; `wandb sync` later
# export WANDB_DIR=$REPO/wandb

# ---- misc ---------------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1                 # logs appear in the job's output file as they happen
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# How many times a FAILED run (trainer status other than 0/85/86) may be requeued. The count
# is SLURM_RESTART_COUNT, which counts every requeue of the job, including the planned ones
# after a checkpoint on SIGUSR1 (status 85).
export MAX_REQUEUES=${MAX_REQUEUES:-20}
# Failure statuses that are never requeued, space-separated: 2 is the trainer's "bad
# configuration or input" (a retry would fail the same way). Set it empty to retry everything.
export NO_RETRY_STATUSES=${NO_RETRY_STATUSES-2}
