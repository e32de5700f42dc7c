# shellcheck shell=bash
# Helpers shared by slurm/devcluster/up and slurm/devcluster/down (sourced).
# shellcheck disable=SC2034  # the settings below are used by up and down

DC_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DC_STATE=$(realpath -m "${DEVCLUSTER_DIR:-/tmp/devcluster}")
DC_PIDS=$DC_STATE/pids          # "name pid comm" per daemon that up started
DC_MODE_FILE=$DC_STATE/mode     # "local" or "netns N"
DC_CREATED=$DC_STATE/created    # "kind name" per netns/link/hosts entry up made
# What the project's tests look for before they submit anything: the cluster sinfo reaches is this
# one (same ClusterName and controller), not a real cluster this machine happens to reach.
DC_MARKER=$DC_STATE/marker
DC_SLURM_ETC=/etc/slurm
DC_CLUSTER=devcluster
DC_PARTITION=debug
DC_BRIDGE=dcbr0
DC_NET=${DEVCLUSTER_NET:-10.77.0}   # first three octets of the node subnet (/24)
DC_NS_PREFIX=devcluster-            # netns names: devcluster-node1, ...
DC_VETH_PREFIX=dcveth               # host end of node i's veth pair: dcveth1, ...
DC_HOSTS_MARK="# devcluster-managed"
DC_DB_PORT=${DEVCLUSTER_DB_PORT:-3307}
DC_DB_NAME=slurm_acct_db
DC_DB_USER=slurm
DC_DB_PASS=devcluster               # local-only (127.0.0.1) dev database
DC_MUNGE_SOCKET=/run/munge/munge.socket.2

# Daemons are started with a clean environment: nothing of the caller's
# (SLURM_*, pytest, venv) leaks into them.
DC_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        HOME=/root LANG=C.UTF-8)

dc_say() { printf 'devcluster: %s\n' "$*"; }
dc_err() { printf 'devcluster: %s\n' "$*" >&2; }

# One up/down at a time (pytest-xdist workers may race to start the cluster).
dc_lock() {
    mkdir -p "$DC_STATE"
    exec 9>"$DC_STATE/.lock"
    if ! flock -w 300 9; then
        dc_err "another up/down holds $DC_STATE/.lock for over 300 s"
        exit 1
    fi
}

# True if pid exists and is not a zombie (a daemon that died while up, its
# parent, is still running stays a zombie until up exits).
dc_running() {
    local pid=$1 state
    [[ -n $pid && -r /proc/$pid/status ]] || return 1
    state=$(awk '/^State:/ {print $2; exit}' "/proc/$pid/status" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

# True if pid is running and is the program we recorded (guards against a
# recycled PID).
dc_running_as() {
    local pid=$1 comm=$2
    dc_running "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# Helpers below return 0 even when nothing matches: they are used in $(...)
# assignments, where a failure would end the script under set -e.
dc_record_line() {
    if [[ -f $DC_PIDS ]]; then awk -v n="$1" '$1 == n' "$DC_PIDS" | tail -n 1; fi
}
dc_pid_of() {
    local l name pid comm
    l=$(dc_record_line "$1")
    if [[ -n $l ]]; then read -r name pid comm <<<"$l"; echo "$pid"; fi
}

# dc_alive NAME: the daemon recorded under NAME is running.
dc_alive() {
    local l name pid comm
    l=$(dc_record_line "$1")
    [[ -n $l ]] || return 1
    read -r name pid comm <<<"$l"
    dc_running_as "$pid" "$comm"
}

dc_record() {
    local name=$1 pid=$2 comm=$3 tmp
    tmp=$(mktemp "$DC_STATE/.pids.XXXXXX")
    if [[ -f $DC_PIDS ]]; then awk -v n="$name" '$1 != n' "$DC_PIDS" >"$tmp"; fi
    echo "$name $pid $comm" >>"$tmp"
    mv -f "$tmp" "$DC_PIDS"
}

dc_created_has() { [[ -f $DC_CREATED ]] && grep -qxF "$1 $2" "$DC_CREATED"; }
dc_created_add() { dc_created_has "$1" "$2" || echo "$1 $2" >>"$DC_CREATED"; }

# Remove our lines from /etc/hosts. Rewrite in place (cat >) rather than
# sed -i/mv: /etc/hosts is often a bind mount that cannot be replaced.
dc_hosts_remove() {
    [[ -f /etc/hosts ]] || return 0
    grep -qF "$DC_HOSTS_MARK" /etc/hosts || return 0
    local tmp
    tmp=$(mktemp)
    grep -vF "$DC_HOSTS_MARK" /etc/hosts >"$tmp" || true
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}

# dc_mark CTL_HOST CTL_ADDR: write the marker (up, once every node answers).
dc_mark() {
    printf '%s\n' "# written by slurm/devcluster/up; removed by down. tests/test_launch.py submits jobs only to this cluster." \
        "ClusterName=$DC_CLUSTER" "SlurmctldHost=$1($2)" >"$DC_MARKER"
}
