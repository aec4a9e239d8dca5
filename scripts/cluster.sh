#!/usr/bin/env bash
# Local distributed clusters for idem's scale-out tests, on loopback ports of their own.
#
#   scripts/cluster.sh start  etcd|redis-cluster [MEMBER]   start (no-op for members already running)
#   scripts/cluster.sh stop   etcd|redis-cluster [MEMBER]   SIGTERM, wait for the exit
#   scripts/cluster.sh kill   etcd|redis-cluster [MEMBER]   SIGKILL: a crash, for failover tests
#   scripts/cluster.sh pause  etcd|redis-cluster MEMBER     SIGSTOP: a hung server (timeouts)
#   scripts/cluster.sh resume etcd|redis-cluster MEMBER     SIGCONT
#   scripts/cluster.sh status etcd|redis-cluster            members, pids, health, leader/roles
#   scripts/cluster.sh endpoints etcd|redis-cluster         the client endpoints, comma-separated
#   scripts/cluster.sh clean  etcd|redis-cluster            stop everything and delete the data
#
# etcd: three members m1..m3 (MEMBER = 1..3), clients on 127.0.0.1:23791-23793, peers on
# 127.0.0.1:23801-23803. Data and logs in /tmp/idem-cluster/etcd/m<N>. The members fsync as
# etcd always does; heartbeat 100 ms, election timeout 2 s (a little slack for busy CI machines).
#
# redis-cluster: six nodes (MEMBER = 1..6) on 127.0.0.1:27001-27006, cluster bus on
# 127.0.0.1:27101-27106, three masters with one replica each, AOF on (appendfsync everysec,
# Redis's default). Redis's default bus port (client port + 10000, here 37001-37006) lies in
# Linux's ephemeral range (32768-60999), where a busy machine's outgoing connections can hold
# it and the node then fails to start; every port here is below that range. Data and logs in
# /tmp/idem-cluster/redis-cluster/node<N>. The first `start` creates the cluster
# (`redis-cli --cluster create`); later starts reuse each node's nodes.conf.
#
# `start` prints the endpoints on its last line. Everything is on 127.0.0.1 and under
# /tmp/idem-cluster (override the root with IDEM_CLUSTER_DIR); nothing else is touched.
# Needs: etcd, etcdctl (Debian: etcd-server etcd-client), redis-server, redis-cli.
set -euo pipefail

ROOT="${IDEM_CLUSTER_DIR:-/tmp/idem-cluster}"
ETCD_MEMBERS=(1 2 3)
REDIS_MEMBERS=(1 2 3 4 5 6)

die() { echo "cluster.sh: $*" >&2; exit 2; }

etcd_client_port() { echo $((23790 + $1)); }
etcd_peer_port() { echo $((23800 + $1)); }
redis_port() { echo $((27000 + $1)); }
redis_bus_port() { echo $((27100 + $1)); }

# The directory, pid file and log of a member.
member_dir() {
    case "$1" in
        etcd) echo "$ROOT/etcd/m$2" ;;
        redis-cluster) echo "$ROOT/redis-cluster/node$2" ;;
    esac
}
pid_file() { echo "$(member_dir "$1" "$2").pid"; }

# The pid of a running member, or nothing.
running_pid() {
    local f pid
    f="$(pid_file "$1" "$2")"
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

describe_pid() { if [[ -n "$1" ]]; then echo "pid $1"; else echo stopped; fi; }

members_of() {
    case "$1" in
        etcd) echo "${ETCD_MEMBERS[@]}" ;;
        redis-cluster) echo "${REDIS_MEMBERS[@]}" ;;
        *) die "unknown cluster '$1' (etcd or redis-cluster)" ;;
    esac
}

# The members a command applies to: the one named, or all.
selected() {
    local cluster="$1" member="${2:-}"
    if [[ -z "$member" ]]; then
        members_of "$cluster"
        return
    fi
    local m
    for m in $(members_of "$cluster"); do
        [[ "$m" == "$member" ]] && { echo "$m"; return; }
    done
    die "$cluster has no member '$member' (members: $(members_of "$cluster"))"
}

endpoints() {
    local out=() m
    case "$1" in
        etcd) for m in "${ETCD_MEMBERS[@]}"; do out+=("http://127.0.0.1:$(etcd_client_port "$m")"); done ;;
        redis-cluster) for m in "${REDIS_MEMBERS[@]}"; do out+=("redis://127.0.0.1:$(redis_port "$m")/"); done ;;
    esac
    local IFS=,
    echo "${out[*]}"
}

# Waits up to $2 seconds for the command $3... to succeed.
wait_for() {
    local what="$1" secs="$2"
    shift 2
    local i
    for ((i = 0; i < secs * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out after ${secs}s waiting for $what"
}

# ------------------------------------------------------------------------------------ etcd

etcd_initial_cluster() {
    local out=() m
    for m in "${ETCD_MEMBERS[@]}"; do out+=("m$m=http://127.0.0.1:$(etcd_peer_port "$m")"); done
    local IFS=,
    echo "${out[*]}"
}

etcd_start_member() {
    local m="$1" dir
    dir="$(member_dir etcd "$m")"
    [[ -n "$(running_pid etcd "$m")" ]] && return 0
    mkdir -p "$dir"
    local client="http://127.0.0.1:$(etcd_client_port "$m")" peer="http://127.0.0.1:$(etcd_peer_port "$m")"
    # The initial-cluster flags are read on the first boot only; a restart rejoins from the
    # member's data directory.
    setsid etcd --name "m$m" --data-dir "$dir/data" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "$(etcd_initial_cluster)" --initial-cluster-token idem-cluster \
        --initial-cluster-state new \
        --heartbeat-interval 100 --election-timeout 2000 \
        --logger zap --log-outputs "$dir/etcd.log" \
        </dev/null >>"$dir/etcd.out" 2>&1 &
    echo $! >"$(pid_file etcd "$m")"
}

etcd_healthy() {
    ETCDCTL_API=3 etcdctl --endpoints="http://127.0.0.1:$(etcd_client_port "$1")" \
        --command-timeout=2s endpoint health
}

etcd_status() {
    local m pid
    for m in "${ETCD_MEMBERS[@]}"; do
        pid="$(running_pid etcd "$m")"
        echo "m$m client 127.0.0.1:$(etcd_client_port "$m") peer 127.0.0.1:$(etcd_peer_port "$m") $(describe_pid "$pid")"
    done
    ETCDCTL_API=3 etcdctl --endpoints="$(endpoints etcd)" --command-timeout=2s \
        endpoint status -w table 2>&1 || true
}

# ------------------------------------------------------------------------------ redis-cluster

redis_start_member() {
    local m="$1" dir port
    dir="$(member_dir redis-cluster "$m")"
    port="$(redis_port "$m")"
    [[ -n "$(running_pid redis-cluster "$m")" ]] && return 0
    mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" \
        --cluster-enabled yes --cluster-port "$(redis_bus_port "$m")" --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
        --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
        --save '' --daemonize yes --pidfile "$(pid_file redis-cluster "$m")" \
        --logfile "$dir/redis.log"
    if ! (wait_for "redis on port $port" 30 redis-cli -p "$port" ping); then
        echo "cluster.sh: last lines of $dir/redis.log:" >&2
        tail -n 20 "$dir/redis.log" >&2 || true
        die "redis on port $port did not start"
    fi
}

redis_cluster_ok() {
    redis-cli -p "$(redis_port 1)" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

redis_create_if_new() {
    # A cluster is created once: when the first node knows no other node.
    local known
    known="$(redis-cli -p "$(redis_port 1)" cluster info | sed -n 's/^cluster_known_nodes:\([0-9]*\).*/\1/p')"
    if [[ "$known" == "1" ]]; then
        local hosts=() m
        for m in "${REDIS_MEMBERS[@]}"; do hosts+=("127.0.0.1:$(redis_port "$m")"); done
        redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
    fi
    wait_for "redis-cluster state ok" 30 redis_cluster_ok
}

redis_status() {
    local m pid
    for m in "${REDIS_MEMBERS[@]}"; do
        pid="$(running_pid redis-cluster "$m")"
        echo "node $m 127.0.0.1:$(redis_port "$m") $(describe_pid "$pid")"
    done
    local port
    for m in "${REDIS_MEMBERS[@]}"; do
        port="$(redis_port "$m")"
        if [[ -n "$(running_pid redis-cluster "$m")" ]]; then
            redis-cli -p "$port" cluster info | grep -E '^cluster_(state|known_nodes|size)' || true
            redis-cli -p "$port" cluster nodes || true
            return 0
        fi
    done
}

# --------------------------------------------------------------------------------- commands

signal_members() {
    local sig="$1" cluster="$2" member="${3:-}" m pid i
    for m in $(selected "$cluster" "$member"); do
        pid="$(running_pid "$cluster" "$m")"
        [[ -n "$pid" ]] || continue
        kill "-$sig" "$pid"
        # A paused member handles SIGTERM only once it runs again.
        [[ "$sig" == TERM ]] && kill -CONT "$pid" 2>/dev/null
        if [[ "$sig" == TERM || "$sig" == KILL ]]; then
            for ((i = 0; i < 150; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -0 "$pid" 2>/dev/null && die "$cluster member $m (pid $pid) did not exit"
            rm -f "$(pid_file "$cluster" "$m")"
        fi
    done
}

start() {
    local cluster="$1" member="${2:-}" m
    case "$cluster" in
        etcd)
            command -v etcd >/dev/null || die "etcd is not installed (apt-get install etcd-server etcd-client)"
            for m in $(selected etcd "$member"); do etcd_start_member "$m"; done
            # A lone member cannot be healthy (no quorum): wait for health only when a
            # majority runs.
            local up=0
            for m in "${ETCD_MEMBERS[@]}"; do [[ -n "$(running_pid etcd "$m")" ]] && up=$((up + 1)); done
            if ((up >= 2)); then
                for m in $(selected etcd "$member"); do
                    wait_for "etcd member m$m to be healthy" 60 etcd_healthy "$m"
                done
            fi
            ;;
        redis-cluster)
            command -v redis-server >/dev/null || die "redis-server is not installed"
            for m in $(selected redis-cluster "$member"); do redis_start_member "$m"; done
            [[ -z "$member" ]] && redis_create_if_new
            ;;
        *) die "unknown cluster '$cluster' (etcd or redis-cluster)" ;;
    esac
    endpoints "$cluster"
}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

[[ $# -ge 2 ]] || usage
command="$1" cluster="$2" member="${3:-}"
members_of "$cluster" >/dev/null
selected "$cluster" "$member" >/dev/null
case "$command" in
    start) start "$cluster" "$member" ;;
    stop) signal_members TERM "$cluster" "$member" ;;
    kill) signal_members KILL "$cluster" "$member" ;;
    pause) [[ -n "$member" ]] || die "pause needs a member"; signal_members STOP "$cluster" "$member" ;;
    resume) [[ -n "$member" ]] || die "resume needs a member"; signal_members CONT "$cluster" "$member" ;;
    status) if [[ "$cluster" == etcd ]]; then etcd_status; else redis_status; fi ;;
    endpoints) endpoints "$cluster" ;;
    clean)
        signal_members CONT "$cluster"
        signal_members TERM "$cluster"
        rm -rf "${ROOT:?}/$cluster"
        ;;
    *) usage ;;
esac
