#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (slurmctld + slurmd as root, munge auth) for tests/cli/test_slurm.py.
# Idempotent: installs what is missing, starts what is not running, and returns once `sinfo` shows the node idle.
# No cgroups (proctrack/linuxproc, task/none): it runs in containers; state, spool and logs under /tmp/slurm.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

# munge: the key (Debian's package makes one; a bare image may lack it), then the daemon as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi

# slurm.conf from this host: its short name and what slurmd detects (CPUs, sockets/cores/threads, RealMemory)
host=$(hostname -s)
node=$(slurmd -C | head -n 1)   # "NodeName=<host> CPUs=... RealMemory=..."
state=/tmp/slurm
mkdir -p "$state/state" "$state/spool" /etc/slurm
conf=$(cat <<EOF
ClusterName=contgen-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MinJobAge=30
KillWait=10
ReturnToService=2
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" > /etc/slurm/slurm.conf
    # a changed configuration needs fresh daemons
    for pid in "$state/slurmd.pid" "$state/slurmctld.pid"; do
        if running "$pid"; then kill "$(cat "$pid")"; sleep 1; fi
    done
fi
running "$state/slurmctld.pid" || slurmctld
running "$state/slurmd.pid" || slurmd

for _ in $(seq 60); do
    node_state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$node_state" in
        idle|mixed|allocated) echo "slurm: node $host is $node_state"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm: node $host did not become idle (state: ${node_state:-none}); see $state/slurmctld.log, $state/slurmd.log" >&2
exit 1
