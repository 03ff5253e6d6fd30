#!/usr/bin/env bash
# Install the SLURM daemons, client tools and munge used by the throwaway test
# cluster in tests/slurm (Debian/Ubuntu, needs root). Idempotent and quiet:
# does nothing when every binary is already on PATH.
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol sinfo munged)
missing=()
for b in "${need[@]}"; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "install_slurm.sh: missing ${missing[*]} and not root; cannot install" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm.sh: missing ${missing[*]} and no apt-get; cannot install" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' postinst scripts try to start system services; in a container
# without systemd that fails harmlessly. The tests run their own daemons.
apt-get install -y -qq --no-install-recommends \
  slurmctld slurmd slurm-client munge >/dev/null
