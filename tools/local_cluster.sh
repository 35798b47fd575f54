#!/usr/bin/env bash
# A two-node Slurm cluster emulated on this one machine, for testing the slurm/ templates.
#
#   tools/local_cluster.sh start    # install (if missing), configure, start, wait until idle
#   tools/local_cluster.sh status   # daemons and sinfo
#   tools/local_cluster.sh stop     # stop the daemons (state dir is kept)
#
# Nodes n1 and n2 are two slurmd processes on 127.0.0.1 (ports 17001/17002), 1 CPU each, so a
# job with --nodes=2 --ntasks-per-node=1 runs one rank "on each node". Everything (munge key and
# socket, slurm.conf, state, spool, logs, pids) lives in $ALBEF_CLUSTER_DIR (default
# /tmp/albef_cluster), so it never touches a real Slurm or munge setup on the host.
# Needs root: it apt-installs packages, appends to /etc/hosts and runs the daemons as root.
set -euo pipefail

DIR=${ALBEF_CLUSTER_DIR:-/tmp/albef_cluster}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
NODES=(n1 n2)
export SLURM_CONF=$CONF

log() { echo "[local_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return
    log "installing slurmctld slurmd slurm-client munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package scripts try to start the system services; without systemd that fails harmlessly
    # (policy-rc.d / invoke-rc.d refuse), and we start our own daemons below anyway.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

add_hosts() {
    # Slurm resolves NodeName when NodeAddr is absent and srun/sbatch print node names; the
    # names must resolve on this machine.
    local n
    for n in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1[[:space:]]+$n\$" /etc/hosts || echo "127.0.0.1 $n" >>/etc/hosts
    done
}

write_config() {
    mkdir -p "$DIR"/{munge,state,spool,log,run}
    chmod 755 "$DIR/munge"    # munged wants its socket dir searchable by all; the key stays 0400
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    # cons_tres with CR_CPU: CPUs are the consumable, so each 1-CPU node takes one task.
    cat >"$CONF" <<EOF
# Written by tools/local_cluster.sh; regenerated on every start.
ClusterName=albef-local
SlurmctldHost=localhost
SlurmctldPort=17000
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job is held before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
# No cgroups in a container: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
# Look at pending jobs every few seconds, so a requeued job restarts soon after its hold.
SchedulerParameters=sched_interval=5,bf_interval=5
# Requeue (scontrol requeue / preemption) must be allowed; a node that restarts is usable again.
JobRequeue=1
ReturnToService=2
# Seconds, kept short so tests of signals and requeue run quickly.
KillWait=10
MinJobAge=300
SlurmdTimeout=60
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
    if ! alive "$DIR/run/munged.pid"; then
        munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed"
    fi
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    local n
    for n in "${NODES[@]}"; do
        alive "$DIR/run/slurmd.$n.pid" && continue
        # Each slurmd gets its own UTS namespace named after its node, so tasks on it see
        # `hostname` = n1 / n2 as on a real cluster; where namespaces are not allowed the tasks
        # still tell the nodes apart by $SLURMD_NODENAME.
        unshare --uts sh -c "hostname $n && exec slurmd -N $n -f $CONF" 2>/dev/null \
            || slurmd -N "$n" -f "$CONF"
    done
}

wait_idle() {
    local n
    for _ in $(seq 60); do
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|alloc|mix)$') == "${#NODES[@]}" ]]; then
            return 0
        fi
        # Nodes left DOWN/DRAIN by an earlier run (e.g. a killed slurmd) are put back in service.
        for n in $(sinfo -h -N -t down,drain -o '%N' 2>/dev/null | sort -u || true); do
            scontrol update NodeName="$n" State=RESUME || true
        done
        sleep 1
    done
    sinfo -N >&2 || true
    die "nodes did not become idle in 60 s; see $DIR/log/"
}

status() {
    local f
    for f in munged slurmctld slurmd.n1 slurmd.n2; do
        if alive "$DIR/run/$f.pid"; then echo "$f: running (pid $(cat "$DIR/run/$f.pid"))"
        else echo "$f: stopped"; fi
    done
    [[ -f $CONF ]] && sinfo -N 2>/dev/null || true
}

stop() {
    local f pid
    for f in slurmd.n1 slurmd.n2 slurmctld munged; do
        if alive "$DIR/run/$f.pid"; then
            pid=$(cat "$DIR/run/$f.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
        rm -f "$DIR/run/$f.pid"
    done
    log "stopped"
}

case ${1:-} in
    start)
        [[ $(id -u) == 0 ]] || die "run as root (installs packages, edits /etc/hosts)"
        install_packages
        add_hosts
        # A running cluster is left alone (idempotent start): the config is only rewritten when
        # no daemon is using it.
        if ! alive "$DIR/run/slurmctld.pid"; then write_config; fi
        start_daemons
        wait_idle
        log "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
        cat <<EOF
Use it with:
  export SLURM_CONF=$CONF
  srun -N2 hostname            # prints n1 and n2
  ALBEF_DATA_ROOT=/tmp sbatch --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --gpus-per-node=0 \\
      slurm/pretrain_4m.sh --config albef_ds/configs/tiny.yaml --max_steps 50
Logs: $DIR/log/   Stop: $0 stop
EOF
        ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
