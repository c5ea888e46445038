#!/bin/bash
# Installs what tests/test_launch.py starts for real: Debian's slurm-wlm and munge (a one-node Slurm cluster) and
# openmpi-bin (mpirun). Needs apt-get and root; without them it says so, and those tests skip with the reason.
set -u
need=()
command -v slurmctld >/dev/null && command -v munged >/dev/null || need+=(slurm-wlm munge)
command -v mpirun >/dev/null || need+=(openmpi-bin)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "tests/system_deps.sh: not installing ${need[*]} (needs apt-get as root); the Slurm/mpirun tests will skip"
    exit 0
fi
echo "tests/system_deps.sh: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq "${need[@]}"; } >/tmp/nsa_system_deps.log 2>&1; then
    echo "tests/system_deps.sh: apt-get failed (log: /tmp/nsa_system_deps.log); the Slurm/mpirun tests will skip"
fi
exit 0
