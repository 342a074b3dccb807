#!/usr/bin/env bash
# A real two-node Slurm cluster on localhost, for the tests of slurm/*.sh (Debian's slurm 22.05 + munge).
#
#   bash .ci/slurm_cluster.sh [start]   install the packages if absent, write the config, start munged,
#                                       slurmctld and slurmd, wait until the node is idle (idempotent: a
#                                       running cluster with the same config is left alone)
#   bash .ci/slurm_cluster.sh stop      stop the daemons this script started (by their pid files)
#   bash .ci/slurm_cluster.sh status    print the node state
#   bash .ci/slurm_cluster.sh conf      print the path of slurm.conf (export SLURM_CONF=... for sbatch/squeue)
#
# Must run as root (no systemd here: the daemons are started by hand). State lives under
# NANOTRONIX_SLURM_DIR (default /tmp/nanotronix-slurm); its slurm.conf is what SLURM_CONF must point at.
#
# The nodes are `hostname -s` and that name with "-b" (a second slurmd, `slurmd -N`, on its own port, spool and
# log; the name is added to /etc/hosts as 127.0.0.1, so a job's first node resolves whichever it is): a job with
# --nodes=2 runs one srun task per node, as on a real cluster, with every process on this machine. Each node
# advertises 8 fake GPUs (gres/gpu backed by stand-ins for /dev/null) and at least 8 CPUs, so the recipes' headers
# (--gres=gpu:8 --exclusive) are accepted unchanged; jobs then run on CPU.
# Checked on Debian 12 with slurm 22.05.8 and munge 0.5.15 (2 cores, root, no systemd).
set -euo pipefail

STATE_DIR=${NANOTRONIX_SLURM_DIR:-/tmp/nanotronix-slurm}
CONF=$STATE_DIR/slurm.conf
NODE=$(hostname -s)
NODE_B=$NODE-b
FAKE_GPUS=8

die() { echo "slurm_cluster: error: $*" >&2; exit 1; }
log() { echo "slurm_cluster: $*" >&2; }

pid_alive() {  # pid_alive PIDFILE
  [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null  # (a daemon that exits removes its pid file)
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {  # writes $CONF.new; the caller decides whether it differs from the running one
  local cpus mem_mb
  cpus=$(nproc)
  [ "$cpus" -ge 8 ] || cpus=8  # declared larger than real (config_overrides): 8-rank jobs still fit
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$STATE_DIR"/{state,spool,run,log}
  cat > "$CONF.new" <<EOF
# Written by .ci/slurm_cluster.sh for the nanotronix tests: two nodes, $NODE and $NODE_B, on 127.0.0.1.
ClusterName=nanotronix-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
EnforcePartLimits=ALL
MailProg=/bin/true
GresTypes=gpu
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
NodeName=$NODE NodeAddr=127.0.0.1 Port=6818 CPUs=$cpus CoresPerSocket=$cpus RealMemory=$mem_mb Gres=gpu:$FAKE_GPUS State=UNKNOWN
NodeName=$NODE_B NodeAddr=127.0.0.1 Port=6828 CPUs=$cpus CoresPerSocket=$cpus RealMemory=$mem_mb Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # gres.conf is read from the folder of slurm.conf. slurmd drops GPUs without device files, so each fake
  # GPU is a character device with /dev/null's numbers (nothing ever opens them: the jobs run on CPU).
  mkdir -p "$STATE_DIR/dev"
  local i
  for i in $(seq 0 $((FAKE_GPUS - 1))); do
    [ -c "$STATE_DIR/dev/gpu$i" ] || mknod "$STATE_DIR/dev/gpu$i" c 1 3 \
      || die "cannot create the fake GPU device $STATE_DIR/dev/gpu$i (mknod; is the folder on a nodev mount?)"
  done
  echo "NodeName=$NODE,$NODE_B Name=gpu File=$STATE_DIR/dev/gpu[0-$((FAKE_GPUS - 1))]" > "$STATE_DIR/gres.conf"
}

add_host_name() {  # the second node's name resolves to this machine (the first is this machine's own name)
  grep -qE "^[^#]*[[:space:]]$NODE_B([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $NODE_B" >> /etc/hosts \
    || die "cannot add $NODE_B to /etc/hosts"
}

start_munge() {
  mkdir -p /run/munge
  chown munge:munge /run/munge
  if pid_alive /run/munge/munged.pid || munge -n </dev/null >/dev/null 2>&1; then
    return
  fi
  [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall the munge package)"
  runuser -u munge -- /usr/sbin/munged
}

node_state() {  # node_state NAME
  SLURM_CONF=$CONF sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n1
}

SLURMD_PIDS=("$STATE_DIR/run/slurmd-$NODE.pid" "$STATE_DIR/run/slurmd-$NODE_B.pid")

stop_daemons() {
  local f
  for f in "${SLURMD_PIDS[@]}" "$STATE_DIR/run/slurmd.pid" "$STATE_DIR/run/slurmctld.pid"; do
    if pid_alive "$f"; then
      kill "$(cat "$f")"
      for _ in $(seq 50); do pid_alive "$f" || break; sleep 0.1; done
      pid_alive "$f" && die "daemon $(cat "$f") ($f) did not stop"
    fi
    rm -f "$f"
  done
}

start() {
  install_packages
  [ "$(id -u)" = 0 ] || die "starting the Slurm daemons needs root"
  write_config
  add_host_name
  if pid_alive "$STATE_DIR/run/slurmctld.pid" && pid_alive "${SLURMD_PIDS[0]}" && pid_alive "${SLURMD_PIDS[1]}" \
     && cmp -s "$CONF" "$CONF.new"; then
    rm -f "$CONF.new"
  else
    stop_daemons
    mv "$CONF.new" "$CONF"
    start_munge
    SLURM_CONF=$CONF slurmctld -f "$CONF"
    SLURM_CONF=$CONF slurmd -f "$CONF" -N "$NODE"
    SLURM_CONF=$CONF slurmd -f "$CONF" -N "$NODE_B"
  fi
  local node state
  for node in "$NODE" "$NODE_B"; do
    state=""
    for _ in $(seq 100); do  # 10 s
      state=$(node_state "$node")
      case "$state" in
        idle|alloc|mix|comp) break ;;
        down*|drain*|drng*) SLURM_CONF=$CONF scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
      esac
      sleep 0.1
    done
    case "$state" in
      idle|alloc|mix|comp) log "node $node is $state (SLURM_CONF=$CONF)" ;;
      *) die "node $node did not become idle (state '${state:-none}'); see $STATE_DIR/log/" ;;
    esac
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop_daemons; log "stopped" ;;
  status) echo "${NODE}: $(node_state "$NODE")"; echo "${NODE_B}: $(node_state "$NODE_B")" ;;
  conf) echo "$CONF" ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (start | stop | status | conf)" ;;
esac
