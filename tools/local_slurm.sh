#!/usr/bin/env bash
# A real 2-node Slurm cluster (node1, node2) on this machine, for tests and for trying the sbatch
# scripts as a user would. Needs Debian's slurm-wlm (apt-get install -y slurm-wlm) and root.
#
#   tools/local_slurm.sh start   # writes $RADIODIFF_SLURM_DIR/slurm.conf, starts slurmctld + 2 slurmd
#   export SLURM_CONF=$RADIODIFF_SLURM_DIR/slurm.conf   # then sbatch, squeue, scancel as usual
#   tools/local_slurm.sh stop
#
# RADIODIFF_SLURM_DIR (default /tmp/radiodiff-slurm) holds the config, state, spool and logs;
# RADIODIFF_SLURM_PORT (default 6917) is the first of the ports used (controller, node daemons).
set -euo pipefail

dir=${RADIODIFF_SLURM_DIR:-/tmp/radiodiff-slurm}
port=${RADIODIFF_SLURM_PORT:-6917}
cpus=${RADIODIFF_SLURM_CPUS:-1}
host=$(hostname -s)
export SLURM_CONF="$dir/slurm.conf"

write_conf() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
  cat >"$SLURM_CONF" <<EOF
ClusterName=radiodiff-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SchedulerParameters=defer_batch
SchedulerType=sched/backfill
KillWait=5
MinJobAge=300
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2))-$((port + 3)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start() {
  if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    echo "local Slurm already running (SLURM_CONF=$SLURM_CONF)"
    return 0
  fi
  command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install -y slurm-wlm" >&2; exit 1; }
  # Another cluster's daemons on these ports (a second checkout, or daemons left by a killed run)
  # would answer this cluster's sinfo and sbatch: refuse rather than talk to them.
  for p in "$port" $((port + 1)) $((port + 2)) $((port + 3)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "local Slurm: port $p on 127.0.0.1 is in use (another cluster's daemons?);" \
        "stop them or set RADIODIFF_SLURM_PORT to another free range of 4 ports" >&2
      exit 1
    fi
  done
  write_conf
  slurmctld -i
  slurmd -N node1
  slurmd -N node2
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c -E '^(idle|mixed|allocated)')" -eq 2 ]; then
      echo "local Slurm up: 2 nodes; export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 1
  done
  echo "local Slurm did not come up; logs in $dir/log" >&2
  sinfo -N >&2 || true
  exit 1
}

stop() {
  # The daemons remove their own pid files as they exit: read each once, tolerate its absence.
  pids=()
  for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid"; do
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    pids+=("$pid")
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  done
  rm -f "$dir"/run/*.pid
  echo "local Slurm stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
