#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests/test_cluster.py and for trying docs/cluster.md
# by hand: installs Debian's slurmctld, slurmd, slurm-client and munge (root, once), writes a
# cluster config for this host only (127.0.0.1, every core of it, requeue allowed), and starts
# munged, slurmctld and slurmd. Idempotent: a running cluster that answers `sinfo` is left alone.
#
#   sudo bash tools/slurm/start_local_slurm.sh      # prints "slurm: ready (N CPUs)" on success
#   bash tools/slurm/start_local_slurm.sh --stop
set -euo pipefail
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

if [ "${1:-}" = "--stop" ]; then
  pkill -x slurmd || true
  pkill -x slurmctld || true
  exit 0
fi

if pgrep -x slurmd > /dev/null && pgrep -x slurmctld > /dev/null && sinfo -h -o %T 2> /dev/null | grep -qE "idle|mix|alloc"; then
  echo "slurm: ready ($(sinfo -h -o %c) CPUs, already running)"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm: installing and starting a local SLURM needs root" >&2
  exit 1
fi

if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null; then
  echo "slurm: installing slurmctld slurmd slurm-client munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq > /dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge > /dev/null
fi

# munge: one key for this host, its daemon running
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2> /dev/null
fi
chown munge:munge /etc/munge/munge.key 2> /dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2> /dev/null || true
if ! pgrep -x munged > /dev/null; then
  runuser -u munge -- munged 2> /dev/null || munged --force
fi

mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
cat > "$CONF" <<CONF
# written by tools/slurm/start_local_slurm.sh: one node, this host, on loopback
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %T 2> /dev/null | grep -qE "idle|mix|alloc"; then
    echo "slurm: ready ($(sinfo -h -o %c) CPUs)"
    exit 0
  fi
  scontrol update nodename="$HOST" state=resume > /dev/null 2>&1 || true
  sleep 1
done
echo "slurm: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
