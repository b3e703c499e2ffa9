#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for CI and for trying `distdl submit slurm`:
# Debian's slurmctld, two slurmd (node1, node2, both on localhost) and munge, without systemd.
#
#   slurm/local_cluster.sh start   # installs the packages if needed (apt, as root); prints SLURM_CONF=...
#   slurm/local_cluster.sh stop    # cancels the jobs, stops the daemons this script started
#
# Everything it writes lives in $DISTDL_SLURM_DIR (default ~/.cache/distdl/slurm), a directory of the
# user's own that it creates with mode 0700 and refuses when another user owns it (never a fixed path
# under /tmp, which anyone could create first). /etc is touched only for munge's key and two /etc/hosts
# names. Commands reach this cluster with SLURM_CONF set to $DISTDL_SLURM_DIR/slurm.conf, so a machine's
# own Slurm setup is left alone.
set -euo pipefail

STATE=${DISTDL_SLURM_DIR:-${HOME:?}/.cache/distdl/slurm}
CONF=$STATE/slurm.conf
CPUS_PER_NODE=${DISTDL_SLURM_CPUS_PER_NODE:-2}
NODE_MEMORY_MB=${DISTDL_SLURM_NODE_MEMORY_MB:-4000}

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

private_state() {
    mkdir -p "$(dirname "$STATE")"
    mkdir -m 0700 "$STATE" 2>/dev/null || true
    { [ -d "$STATE" ] && [ ! -L "$STATE" ]; } || die "$STATE (DISTDL_SLURM_DIR) is not a directory"
    [ "$(stat -c %u "$STATE")" = "$(id -u)" ] \
        || die "$STATE (DISTDL_SLURM_DIR) belongs to another user; set DISTDL_SLURM_DIR to a folder of your own"
    chmod 0700 "$STATE"
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root (apt-get)"
    command -v apt-get >/dev/null || die "Slurm is not installed and this machine has no apt-get"
    apt-get update -qq
    # The three daemons' packages only (the slurm-wlm metapackage pulls in ~43).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    # munged refuses to run as root ("PRNG seed dir is insecure").
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/started-munge"
}

write_conf() {
    local host
    host=$(hostname -s)
    mkdir -p "$STATE/ctld"
    cat >"$CONF" <<EOF
ClusterName=distdl-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# No accounting here, so finished jobs are seen through scontrol for a while.
MinJobAge=600
ReturnToService=2
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=6821-6822 CPUs=$CPUS_PER_NODE RealMemory=$NODE_MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    for node in node1 node2; do
        grep -qE "^127\.0\.0\.1\s.*\b$node\b" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts
        mkdir -p "$STATE/slurmd-$node"
    done
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    [ "$(id -u)" = 0 ] || die "starting slurmctld and slurmd needs root"
    private_state
    start_munge
    write_conf
    export SLURM_CONF=$CONF
    running "$STATE/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
    for node in node1 node2; do
        running "$STATE/slurmd-$node.pid" || /usr/sbin/slurmd -f "$CONF" -N "$node"
    done
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]; then
            echo "SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "the two nodes did not come up in 30 s; see $STATE/*.log"
}

stop() {
    [ -e "$STATE" ] || return 0
    private_state
    [ -f "$CONF" ] || return 0
    export SLURM_CONF=$CONF
    scancel --full --quiet --partition=debug 2>/dev/null || true
    for pidfile in "$STATE"/slurmd-node*.pid "$STATE/slurmctld.pid"; do
        running "$pidfile" && kill "$(cat "$pidfile")"
    done
    for pidfile in "$STATE"/slurmd-node*.pid "$STATE/slurmctld.pid"; do
        for _ in $(seq 1 40); do running "$pidfile" || break; sleep 0.25; done
    done
    if [ -f "$STATE/started-munge" ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE/started-munge"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
