#!/usr/bin/env bash
# A real single-node Slurm on this machine, on 127.0.0.1 only, for the Slurm tests (tests/test_slurm.py):
#   bash .ci/slurm.sh start   # install slurm-wlm + munge if missing, configure, start; wait for the node
#   bash .ci/slurm.sh stop    # end the daemons by their pid files
# Both are idempotent and print one line. Recipe and figures: the cluster-emulation note (Debian 12,
# Slurm 22.05). Needs root (or sudo). It writes /etc/slurm/slurm.conf only when that file is absent or
# one this script wrote: a machine with a real Slurm configuration is left alone.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by dpo-pipeline .ci/slurm.sh"
PIDS=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)  # stop order: node, controller, munge
WAIT_S=60

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

alive() { [ -s "$1" ] && as_root kill -0 "$(as_root cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -n "$(hostname)" -o %t 2>/dev/null || true; }

write_conf() {
    local host cpus mem
    host=$(hostname)
    # The CPUs slurmd detects, not `nproc`: that obeys OMP_NUM_THREADS (1 in the tests' environment), and a
    # node configured with 1 CPU never fits `srun -n 2`.
    cpus=$(/usr/sbin/slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    # slurmd drains a node that has less memory than configured: stay 10 % under what `free` reports.
    mem=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    as_root mkdir -p /etc/slurm
    as_root tee "$CONF" >/dev/null <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    echo "CPUs=$cpus RealMemory=$mem"
}

start() {
    local did=() sizes="" state waited=0
    if ! command -v slurmctld >/dev/null; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
        did+=("installed slurm-wlm munge")
    fi
    if [ -e "$CONF" ] && ! as_root grep -qxF "$MARKER" "$CONF"; then
        echo "slurm: $CONF was not written by this script; not touching it (stop that Slurm or test on it)" >&2
        exit 1
    fi
    if ! as_root test -s /etc/munge/munge.key; then
        as_root mungekey --create --force
        as_root chown munge:munge /etc/munge/munge.key
        as_root chmod 400 /etc/munge/munge.key
    fi
    as_root mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    as_root chown munge:munge /run/munge
    as_root chown slurm:slurm /var/spool/slurmctld /var/log/slurm
    if ! alive /run/munge/munged.pid; then
        as_root su -s /bin/sh munge -c /usr/sbin/munged
        did+=("munged")
    fi
    if ! alive /run/slurmctld.pid || ! alive /run/slurmd.pid; then
        sizes=$(write_conf)
        # -c: forget the jobs and node states of an earlier start; this cluster only ever serves tests.
        alive /run/slurmctld.pid || { as_root /usr/sbin/slurmctld -c; did+=("slurmctld"); }
        alive /run/slurmd.pid || { as_root /usr/sbin/slurmd; did+=("slurmd"); }
    fi
    # Exactly these: a suffix (idle*, idle~ ...) means not responding or powered down.
    until state=$(node_state); [[ "$state" =~ ^(idle|mix|alloc)$ ]]; do
        if (( waited >= WAIT_S )); then
            echo "slurm: node $(hostname) not up after ${WAIT_S} s (state '${state}'); logs:" >&2
            as_root tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    if [ ${#did[@]} -eq 0 ]; then
        echo "slurm: already running; node $(hostname) $state"
    else
        echo "slurm: started ${did[*]} on 127.0.0.1 ($sizes); node $(hostname) $state after ${waited} s"
    fi
}

stop() {
    local stopped=() pid_file pid waited
    for pid_file in "${PIDS[@]}"; do
        alive "$pid_file" || continue
        pid=$(as_root cat "$pid_file")
        as_root kill "$pid"
        for ((waited = 0; waited < 100; waited++)); do  # 10 s, then SIGKILL
            as_root kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        as_root kill -9 "$pid" 2>/dev/null || true
        stopped+=("$(basename "$pid_file" .pid)")
    done
    if [ ${#stopped[@]} -eq 0 ]; then
        echo "slurm: nothing running"
    else
        echo "slurm: stopped ${stopped[*]}"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
