#!/usr/bin/env bash
# Separate "hosts" on one machine, for multi-host tests (root only). Each host is a network
# namespace with a veth into a private bridge (10.77.0.0/24, in a namespace of its own, so
# nothing touches the machine's network), and every process entered into it also gets its own
# UTS name (the host name), /etc/hosts (the hosts' names), /dev/shm and /tmp (per host, shared
# by everything on that host, on a tmpfs). Open MPI reaches the hosts through a launch agent
# that enters the namespace instead of ssh (with a login-like environment, as ssh would give).
#
#   tools/nshosts.sh [--hosts K] [--slots L] [--slurm] -- COMMAND [ARGS...]
#
# --slurm also runs a Slurm cluster on the hosts (Debian's slurmctld, slurmd, munge; installed
# from apt when missing): munged and slurmctld on head, one slurmd per host (nodes h1..hK, L CPUs
# each, partition "debug"), each slurmd with its host's own /tmp (so srun --mpi=pmix's
# /tmp/spmix_appdir_* of two nodes cannot collide); COMMAND gets SLURM_CONF and runs once every
# node is idle, so srun, sbatch, sinfo and squeue work as on a login node.
#
# runs COMMAND on the host "head" (10.77.0.1; the hosts are h1..hK, 10.77.0.2..) with
#   NSHOSTS_DIR       this run's directory (hosts file, agent, per-host /tmp and /dev/shm)
#   NSHOSTS_NS        the namespaces' prefix: host hI is network namespace $NSHOSTS_NS-hI
#   NSHOSTS_HOSTFILE  an Open MPI hostfile, "hI slots=L" per host
#   NSHOSTS_MPIRUN    mpirun's options for the hosts (agent, hostfile, TCP over the veths only),
#                     e.g. mpirun $NSHOSTS_MPIRUN -np 4 PROGRAM
#   NSHOSTS_ENTER     `$NSHOSTS_ENTER hI CMD...` runs CMD on host hI (as the agent does)
#   NSHOSTS_CUT       `$NSHOSTS_CUT hI` takes host hI's link down (its network is cut)
# and exits with COMMAND's status. Everything it made (namespaces, veths, bridge, mounts,
# processes left in the namespaces) is removed at the end, also on failure or a signal; a run
# killed with SIGKILL is cleaned by the next run (its namespaces are named after its pid).
# Exits 77 with "nshosts: SKIP: why" where the machine refuses namespaces.
set -euo pipefail

hosts=2 slots=2 slurm=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --slurm) slurm=1; shift ;;
    --hosts) hosts=$2; shift 2 ;;
    --slots) slots=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "nshosts: unknown option $1 (expected --hosts K, --slots L, --slurm, -- COMMAND)" >&2; exit 2 ;;
    esac
done
[[ $# -gt 0 ]] || { echo "nshosts: no COMMAND after --" >&2; exit 2; }
[[ $hosts =~ ^[1-9]$ ]] || { echo "nshosts: --hosts $hosts: expected 1 to 9" >&2; exit 2; }
[[ $slots =~ ^[1-9][0-9]*$ ]] || { echo "nshosts: --slots $slots: expected a count" >&2; exit 2; }

skip() { echo "nshosts: SKIP: $*" >&2; exit 77; }
[[ $(id -u) == 0 ]] || skip "needs root (network namespaces, mounts)"
for t in ip nsenter unshare mount hostname; do
    command -v $t >/dev/null || skip "$t is not installed"
done

unshare --uts --mount --propagation private true 2>/dev/null ||
    skip "unshare --uts --mount is refused (no UTS or mount namespaces)"

prefix=tpn$$
# Leftovers of runs that were SIGKILLed: namespaces named after a pid that is gone.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^tpn[0-9]+-' || true); do
    pid=${ns#tpn}; pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    fi
done
for d in /run/tprun-nshosts.*; do
    [[ -d $d ]] || continue
    kill -0 "${d##*.}" 2>/dev/null && continue
    umount -l "$d" 2>/dev/null || true
    rmdir "$d" 2>/dev/null || true
done

dir=/run/tprun-nshosts.$$
names=(head)
for i in $(seq 1 "$hosts"); do names+=("h$i"); done
made=()
cleanup() {
    local rc=$?
    # A second signal (timeout(1) signals the child and then its whole group) must not cut the
    # cleanup short.
    trap - EXIT
    trap '' INT TERM HUP
    for ns in "${made[@]}"; do
        # Whatever still runs on a host (an orted, a rank) was started by this run.
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    done
    for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if mountpoint -q "$dir" 2>/dev/null; then umount -l "$dir" || true; fi
    rmdir "$dir" 2>/dev/null || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

mkdir -p "$dir"
mount -t tmpfs -o size=2g,mode=0755 tprun-nshosts "$dir" || skip "cannot mount a tmpfs"
{
    echo "127.0.0.1 localhost"
    for i in "${!names[@]}"; do echo "10.77.0.$((i + 1)) ${names[$i]}"; done
} >"$dir/hosts"
: >"$dir/hostfile"
for i in $(seq 1 "$hosts"); do echo "h$i slots=$slots" >>"$dir/hostfile"; done

add_ns() {
    ip netns add "$prefix-$1" 2>"$dir/err" || skip "ip netns add: $(cat "$dir/err")"
    made+=("$prefix-$1")
}
add_ns hub
ip -n "$prefix-hub" link add br0 type bridge || skip "no bridge device (kernel module bridge)"
ip -n "$prefix-hub" link set br0 up
for i in "${!names[@]}"; do
    h=${names[$i]}
    add_ns "$h"
    mkdir -p "$dir/$h/tmp" "$dir/$h/shm"
    chmod 1777 "$dir/$h/tmp" "$dir/$h/shm"
    ip -n "$prefix-hub" link add "v$h" type veth peer name eth0 netns "$prefix-$h" ||
        skip "no veth device"
    ip -n "$prefix-hub" link set "v$h" master br0 up
    ip -n "$prefix-$h" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$prefix-$h" link set eth0 up
    ip -n "$prefix-$h" link set lo up
done

# A checkout under /tmp (where the hosts get a /tmp of their own) stays visible at its path.
keep=
case "$(pwd -P)/" in /tmp/*) keep=$(pwd -P) ;; esac
# enter HOST CMD...: CMD on HOST, in a fresh mount and UTS namespace inside the host's network.
cat >"$dir/enter" <<EOF
#!/bin/sh
host=\$1; shift
[ -e /run/netns/$prefix-\$host ] || { echo "nshosts: no host \$host" >&2; exit 2; }
exec nsenter --net=/run/netns/$prefix-\$host unshare --uts --mount --propagation private /bin/sh -c '
set -e
hostname "\$0"
mount --bind "$dir/hosts" /etc/hosts
mount --bind "$dir/\$0/shm" /dev/shm
if [ -n "$keep" ]; then mkdir -p "$dir/\$0/hold"; mount --bind "$keep" "$dir/\$0/hold"; fi
mount --bind "$dir/\$0/tmp" /tmp
if [ -n "$keep" ]; then mkdir -p "$keep"; mount --bind "$dir/\$0/hold" "$keep"; fi
exec "\$@"' "\$host" "\$@"
EOF
# agent HOST COMMAND-LINE...: what mpirun calls instead of ssh; like sshd, it runs the command
# line with a shell and a login-like environment (only what mpirun passes on reaches the ranks).
cat >"$dir/agent" <<EOF
#!/bin/sh
host=\$1; shift
exec "$dir/enter" "\$host" env -i PATH="\$PATH" HOME="\${HOME:-/root}" LANG=C.UTF-8 /bin/sh -c "\$*"
EOF
cat >"$dir/cut" <<EOF
#!/bin/sh
exec ip -n "$prefix-hub" link set "v\$1" down
EOF
chmod 755 "$dir/enter" "$dir/agent" "$dir/cut"

# start_slurm: munged, slurmctld on head, a slurmd on every host; waits until every node is idle.
start_slurm() {
    local need=()
    for t in munged:munge slurmctld:slurmctld slurmd:slurmd srun:slurm-client; do
        command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
    done
    if [[ ${#need[@]} -gt 0 ]]; then
        echo "nshosts: installing ${need[*]} from apt" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
            { echo "nshosts: cannot install ${need[*]}" >&2; return 1; }
    fi
    local s=$dir/slurm
    mkdir -p "$s/munge" "$s/sock" "$s/ctld" "$s/spool" "$s/log"
    chmod 700 "$s/munge"
    head -c 1024 /dev/urandom >"$s/munge/key"
    chmod 400 "$s/munge/key"
    "$dir/enter" head munged --key-file="$s/munge/key" --socket="$s/sock/munge" \
        --pid-file="$s/munge/pid" --log-file="$s/log/munged.log" --seed-file="$s/munge/seed" ||
        { echo "nshosts: munged did not start: $(tail -3 "$s/log/munged.log" 2>/dev/null)" >&2; return 1; }
    local nodes=()
    for i in $(seq 1 "$hosts"); do
        nodes+=("NodeName=h$i NodeAddr=10.77.0.$((i + 1)) CPUs=$slots RealMemory=1000 State=UNKNOWN")
    done
    cat >"$s/slurm.conf" <<CONF
ClusterName=tprunci
SlurmctldHost=head(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$s/sock/munge
StateSaveLocation=$s/ctld
SlurmdSpoolDir=$s/spool/%n
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd-%n.pid
SlurmctldLogFile=$s/log/slurmctld.log
SlurmdLogFile=$s/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdTimeout=10
SlurmdParameters=config_overrides
$(printf '%s\n' "${nodes[@]}")
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$s/slurm.conf
    "$dir/enter" head slurmctld -c ||
        { echo "nshosts: slurmctld did not start: $(tail -5 "$s/log/slurmctld.log")" >&2; return 1; }
    for i in $(seq 1 "$hosts"); do
        "$dir/enter" "h$i" slurmd ||
            { echo "nshosts: slurmd on h$i did not start: $(tail -5 "$s/log/slurmd-h$i.log")" >&2; return 1; }
    done
    local t
    for t in $(seq 1 600); do
        local states
        states=$("$dir/enter" head sinfo -hN -o %T 2>/dev/null | sort -u | tr '\n' ' ')
        [[ $states == "idle " ]] && return 0
        sleep 0.1
    done
    echo "nshosts: the Slurm nodes did not become idle within 60 s (states: $states)" >&2
    tail -5 "$s/log/slurmctld.log" "$s"/log/slurmd-*.log >&2
    return 1
}
[[ $slurm == 0 ]] || start_slurm

export NSHOSTS_NS=$prefix NSHOSTS_DIR=$dir NSHOSTS_HOSTFILE=$dir/hostfile NSHOSTS_ENTER=$dir/enter NSHOSTS_CUT=$dir/cut
# TCP keepalive on mpirun's links to its daemons (Open MPI's default notices a lost host after
# 300 + 9 x 20 s): a host whose network is cut is reported ("ORTE has lost communication with a
# remote daemon ... on node hI") and the job ended within about 10 s.
export NSHOSTS_MPIRUN="--allow-run-as-root --hostfile $dir/hostfile --mca plm_rsh_agent $dir/agent --mca plm_rsh_no_tree_spawn 1 --mca btl vader,tcp,self --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 --mca oob_tcp_keepalive_time 5 --mca oob_tcp_keepalive_intvl 2 --mca oob_tcp_keepalive_probes 3"
# In the background, so a signal to this script runs the cleanup at once (bash defers traps
# while a foreground command runs); the cleanup ends COMMAND (it runs on host head).
set +e
"$dir/enter" head "$@" &
wait $!
rc=$?
set -e
exit "$rc"
