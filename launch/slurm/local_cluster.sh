#!/usr/bin/env bash
# A real two-node Slurm cluster on one Debian machine, to try (and test) the cluster path without a cluster.
#
#   sudo launch/slurm/local_cluster.sh up       # install slurm + munge (apt), write the config, start the daemons
#   launch/slurm/local_cluster.sh status        # sinfo
#   sudo launch/slurm/local_cluster.sh down     # stop the daemons (the packages and config stay)
#
# What it builds: Debian's Slurm (22.05 on bookworm) with one controller and two compute daemons, nodes `n1` and
# `n2`, both on this host (`slurmd -N n1` / `slurmd -N n2`, own ports, spool, log and pid files through `%n`;
# NodeAddr 127.0.0.1, and n1 / n2 mapped to 127.0.0.1 in /etc/hosts so that a rendezvous on "the first node of
# the allocation" resolves). No cgroups (proctrack/linuxproc, task/none) and no GPUs: the sbatch scripts then run
# CPU processes over gloo. No accounting daemon: `scontrol show job N` replaces `sacct`.
# The config lives in /etc/slurm/slurm.conf (Debian's place; any existing one is kept as slurm.conf.evaclip-bak);
# state, logs and spool in $EVACLIP_SLURM_DIR (default /var/tmp/evaclip-slurm). Takes about a minute the first
# time (the apt install), a few seconds after. Needs root.
set -euo pipefail

STATE=${EVACLIP_SLURM_DIR:-/var/tmp/evaclip-slurm}
CPUS=${EVACLIP_SLURM_CPUS:-$(nproc)}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname)

die() { echo "local_cluster: $*" >&2; exit 1; }
# exit codes a caller (the test tier) can tell apart: 4 = not root, 5 = the packages cannot be installed here
need_root() { [[ $(id -u) == 0 ]] || { echo "local_cluster: needs root (it installs packages and starts system daemons)" >&2; exit 4; }; }
cannot_install() { echo "local_cluster: $*" >&2; exit 5; }

# wait up to $1 seconds for "$2..." to succeed; say what did not come up
wait_for() {
    local bound=$1; shift
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        (( SECONDS - t0 < bound )) || return 1
        sleep 1
    done
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || cannot_install "slurm is not installed and there is no apt-get to install it"
    echo "local_cluster: installing slurmctld slurmd slurm-client munge (apt)"
    apt-get update -qq || cannot_install "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null || cannot_install "apt-get install of slurm / munge failed"
}

write_config() {
    mkdir -p /etc/slurm "$STATE"/{ctld,spool,log,run}
    if [[ -f $CONF ]] && ! grep -q "evaclip local_cluster" "$CONF"; then
        cp "$CONF" "$CONF.evaclip-bak"
    fi
    cat > "$CONF" <<EOF
# written by evaclip launch/slurm/local_cluster.sh (evaclip local_cluster): two nodes on one host
ClusterName=evaclip
SlurmctldHost=$HOST
SlurmUser=root
SlurmctldPort=16817
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdSpoolDir=$STATE/spool/%n
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdPidFile=$STATE/run/slurmd-%n.pid
AuthType=auth/munge
# a requeued job waits the credential lifetime before it may start again (120 s by default)
AuthInfo=cred_expire=30
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at the queue every few seconds (a requeued job becomes eligible without an event that wakes the scheduler)
SchedulerParameters=sched_interval=5,bf_interval=5
JobRequeue=1
# finished jobs stay visible to scontrol show job for 10 minutes (no accounting daemon here)
MinJobAge=600
ReturnToService=2
SlurmdTimeout=60
KillWait=30
# preemption signals reach a job's --signal handler too (see launch/README: preemption)
SlurmctldParameters=preempt_send_user_signal
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    # n1 / n2 are what `scontrol show hostnames` gives: the rendezvous must resolve them
    grep -qE "^127\.0\.0\.1[[:space:]]+n1 n2" /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
}

start_munge() {
    if ! munge -n >/dev/null 2>&1; then
        mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
        if [[ ! -s /etc/munge/munge.key ]]; then
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chmod 0400 /etc/munge/munge.key
        if id munge >/dev/null 2>&1; then  # as Debian runs it: its files owned by its own user
            chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
            runuser -u munge -- munged --force || die "munged did not start: see /var/log/munge/munged.log"
        else
            munged --force || die "munged did not start: see /var/log/munge/munged.log"
        fi
    fi
    wait_for 20 munge -n || die "munge does not answer (munge -n)"
}

start_slurm() {
    if ! pgrep -f "slurmctld" >/dev/null; then
        slurmctld || die "slurmctld did not start: see $STATE/log/slurmctld.log"
    fi
    wait_for 30 scontrol ping || die "slurmctld does not answer: see $STATE/log/slurmctld.log"
    for n in n1 n2; do
        if ! pgrep -f "slurmd -N $n" >/dev/null; then
            slurmd -N "$n" || die "slurmd -N $n did not start: see $STATE/log/slurmd-$n.log"
        fi
    done
    scontrol update NodeName=n[1-2] State=RESUME >/dev/null 2>&1 || true
    wait_for 60 bash -c '[[ $(sinfo -h -N -o %T | grep -cE "^(idle|mixed|allocated)") == 2 ]]' \
        || { sinfo -N >&2; die "the two nodes are not idle after 60 s: see $STATE/log/slurmd-n*.log"; }
}

stop_all() {
    for p in "slurmd -N n1" "slurmd -N n2" "slurmctld"; do
        pkill -f "$p" 2>/dev/null || true
    done
    wait_for 20 bash -c '! pgrep -f "slurmctld|slurmd -N" >/dev/null' || pkill -9 -f "slurmctld|slurmd -N" || true
}

case "${1:-}" in
    up)
        need_root
        install_packages
        write_config
        start_munge
        start_slurm
        sinfo -N
        echo "local_cluster: up (nodes n1 n2, config $CONF, logs $STATE/log)"
        ;;
    down)
        need_root
        stop_all
        echo "local_cluster: down"
        ;;
    status)
        sinfo -N
        ;;
    *)
        echo "usage: $0 up | down | status" >&2
        exit 2
        ;;
esac
