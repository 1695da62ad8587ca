#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (munge + slurmctld + slurmd), for trying cluster mode on a
# laptop and for the tests in tests/cluster/. Debian/Ubuntu, root (or sudo).
#
#   slurm/local-cluster.sh start    install if needed, write the config, start the daemons, wait for the node
#   slurm/local-cluster.sh status   exit 0 when the node answers and is usable
#   slurm/local-cluster.sh stop     stop the daemons this script started (pid files), keep the config
#
# Idempotent: `start` on a running cluster only checks it. The daemons bind 127.0.0.1 only and the cluster
# has exactly one node: this one. Everything the daemons write lives under $STATE
# (/var/lib/strata-slurm: spool, state, logs, pid files). The config goes to /etc/slurm/slurm.conf, where
# sbatch/srun/squeue look by default, but only if that file is absent or was written by this script: a real
# cluster's config is never overwritten.
set -euo pipefail

STATE="${STRATA_SLURM_STATE:-/var/lib/strata-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# Written by Strata's slurm/local-cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { printf '[local-cluster] %s\n' "$*"; }
die() { printf '[local-cluster] error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_resolvable() {
  # Jobs address ranks by node name (TF_CONFIG): the name must resolve. Most machines list it in /etc/hosts.
  local host
  host="$(hostname -s)"
  if ! getent hosts "$host" >/dev/null; then
    log "adding '127.0.0.1 $host' to /etc/hosts (the node name must resolve)"
    echo "127.0.0.1 $host  # added by Strata's slurm/local-cluster.sh" | as_root tee -a /etc/hosts >/dev/null
  fi
}

write_config() {
  local host cpus mem
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
  if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script; this machine already has a SLURM config (stop here, or move it away)"
  fi
  as_root mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/log"
  # Notes: linuxproc/task none because containers have no usable cgroups; MpiDefault=none so a plain srun
  # sets no PMI variables (Strata's Horovod jobs ask for --mpi=pmix explicitly); KillWait is the grace
  # between SIGTERM and SIGKILL at cancel/time limit (the ranks checkpoint within it); MinJobAge keeps
  # finished jobs visible to scontrol for the tests; cred_expire (default 120 s) is also how long a requeued
  # job waits before it may start again: a requeued job started sooner is killed as "credential revoked".
  as_root tee "$CONF.tmp" >/dev/null <<CONF
$MARK (state in $STATE). Safe to delete.
ClusterName=strata-local
SlurmctldHost=$host(127.0.0.1)
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=20
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  as_root mv "$CONF.tmp" "$CONF"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ready() {
  # The node is usable when sinfo shows it idle, mixed or allocated (not down/drained/unknown).
  local state
  state="$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -1)" || return 1
  case "$state" in idle*|mix*|alloc*|completing*) return 0 ;; *) return 1 ;; esac
}

start() {
  install_packages
  ensure_resolvable
  write_config
  # munge: the package creates /etc/munge/munge.key; create one if it is missing.
  as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || as_root mungekey --create
  as_root chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  if ! timeout 5 munge -n >/dev/null 2>&1; then
    log "starting munged"
    as_root runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do timeout 5 munge -n >/dev/null 2>&1 && break; sleep 0.5; done
    timeout 5 munge -n | timeout 5 unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  fi
  if ! alive "$STATE/slurmctld.pid"; then
    log "starting slurmctld"
    as_root slurmctld
  fi
  for _ in $(seq 40); do timeout 5 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
  timeout 5 scontrol ping | grep -q UP || die "slurmctld does not answer (see $STATE/log/slurmctld.log)"
  if ! alive "$STATE/slurmd.pid"; then
    log "starting slurmd"
    as_root slurmd
  fi
  for _ in $(seq 60); do node_ready && break; sleep 0.5; done
  if ! node_ready; then
    # A node left DOWN by an earlier unclean stop: bring it back (it is ours).
    as_root scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    for _ in $(seq 20); do node_ready && break; sleep 0.5; done
  fi
  node_ready || die "node $(hostname -s) is not usable: $(sinfo -h -N -o '%T %E' 2>&1 | head -1) (see $STATE/log/slurmd.log)"
  log "up: $(sinfo -h -o '%P %D node(s) %T, %c CPUs' | head -1)"
}

stop() {
  for daemon in slurmd slurmctld; do
    local pidfile="$STATE/$daemon.pid"
    if alive "$pidfile"; then
      local pid
      pid="$(cat "$pidfile")"
      log "stopping $daemon (pid $pid)"
      as_root kill -TERM "$pid"
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
  done
  # munged stays up: other software on the machine may use it, and it costs nothing.
  log "stopped"
}

status() {
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && node_ready; then
    log "running: $(sinfo -h -o '%P %D node(s) %T, %c CPUs' | head -1)"
    return 0
  fi
  log "not running"
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
