#!/bin/bash
# sbatch wrapper: creates logs/ first (sbatch opens --output=logs/... when the job starts; if
# the directory is missing the job FAILS at launch with Reason=JobLaunchFailure and no output
# anywhere), and submits from the repository root so the job finds slurm/common.sh.
#   slurm/submit.sh [sbatch options] slurm/pretrain_ec.sh
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p logs
exec sbatch "$@"
