#!/bin/bash
# Bring up a one-node SLURM cluster on this machine from Debian's packages (slurm-wlm 22.05, munge), for
# tests/test_slurm.py (`nox -s slurm`). Idempotent: a second call finds the daemons running and only checks them.
# Needs root (it writes /etc/slurm/slurm.conf and starts munged, slurmctld and slurmd by hand: no systemd needed).
#
#   bash tools/slurm/up.sh        # install if needed, configure, start, wait until the node is idle
#   bash tools/slurm/down.sh      # stop the three daemons (by their pid files)
#
# Settings: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups in a container),
# JobAcctGatherType=jobacct_gather/none, one node with the CPUs and memory `slurmd -C` reports, one partition
# "cpu". AuthInfo=cred_expire=10: a requeued job waits cred_expire seconds before it may start again (120 by
# default), which would make the requeue tests wait two minutes for nothing. sched_interval=5,bf_interval=5: the
# scheduler looks at a requeued job again within seconds of it becoming eligible (60 and 30 s by default).
# slurmd runs under `nice -n 19`, so the jobs it starts (which inherit its niceness) leave a shared machine usable.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/lib/driml-slurm
LOG=/var/log/driml-slurm

if [ "$(id -u)" != 0 ]; then
  echo "up.sh: error: needs root (writes $CONF, starts munged/slurmctld/slurmd)" >&2
  exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- munge, as the munge user
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  runuser -u munge -- /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
fi
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null

# --- slurm.conf: this machine as the only node
HOST=$(hostname -s)
read -r CPUS MEM < <(slurmd -C | awk '/^NodeName/ {for (i = 1; i <= NF; i++) {split($i, kv, "=");
  if (kv[1] == "CPUs") c = kv[2]; if (kv[1] == "RealMemory") m = kv[2]}} END {print c, m}')
mkdir -p "$STATE/ctld" "$STATE/d" "$LOG" /etc/slurm
NEW=$(cat <<CONF
# written by tools/slurm/up.sh (driml_pl): a one-node test cluster
ClusterName=driml
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
)
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW" ]; then
  printf '%s\n' "$NEW" >"$CONF"
  CHANGED=1
else
  CHANGED=0
fi

# --- the daemons, by hand
if alive /run/slurmctld.pid && [ "$CHANGED" = 1 ]; then scontrol reconfigure; fi
alive /run/slurmctld.pid || slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
alive /run/slurmd.pid || nice -n 19 slurmd
for _ in $(seq 150); do
  STATE_NOW=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)
  case "$STATE_NOW" in idle | mixed | allocated) break ;; esac
  sleep 0.2
done
case "${STATE_NOW:-}" in
  idle | mixed | allocated) ;;
  *) scontrol update nodename="$HOST" state=resume 2>/dev/null || true; sleep 1
     STATE_NOW=$(sinfo -h -n "$HOST" -o %T | head -1) ;;
esac
echo "slurm up: node $HOST ($CPUS CPUs, $MEM MB) is $STATE_NOW; partition cpu; logs in $LOG"
[ "$STATE_NOW" = idle ] || [ "$STATE_NOW" = mixed ] || [ "$STATE_NOW" = allocated ]
