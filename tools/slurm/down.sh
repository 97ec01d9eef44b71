#!/bin/bash
# Stop the cluster tools/slurm/up.sh started: slurmd, slurmctld and munged, each by its pid file. Jobs still running
# are killed with slurmd; the controller's state (queued jobs) stays in /var/lib/driml-slurm for the next up.sh.
set -uo pipefail
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped $(basename "$pidfile" .pid) (pid $pid)"
  fi
done
