#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, beside (never touching) the main node on 5672:
# nodes rc1@localhost..rc3@localhost, AMQP on 127.0.0.1:5701-5703, Erlang distribution on
# 25701-25703, no plugins, data and logs under $CLUSTER_DIR, an Erlang cookie of its own.
#
# Usage: scripts/cluster.sh start        fresh nodes, clustered (rc2, rc3 join rc1)
#        scripts/cluster.sh stop         stop all three
#        scripts/cluster.sh stop-node N  stop node N (its data stays: it rejoins on start-node)
#        scripts/cluster.sh start-node N start node N again and wait until it runs
#        scripts/cluster.sh ctl N ARGS   rabbitmqctl ARGS against node N
#        scripts/cluster.sh status       cluster_status as node 1 sees it
set -euo pipefail

# rabbitmq-server lives in sbin, which a non-login PATH may lack; the Debian wrapper there
# switches to the rabbitmq user, so the nodes are run from its real scripts instead.
export PATH="/usr/lib/rabbitmq/bin:$PATH:/usr/local/sbin:/usr/sbin:/sbin"
here=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER_DIR=${CLUSTER_DIR:-$here/target/rabbitmq-cluster}
NODES=(1 2 3)
AMQP_BASE=5700
DIST_BASE=25700

log() { echo "cluster: $*"; }
die() { echo "cluster: ERROR: $*" >&2; exit 1; }

command -v rabbitmq-server >/dev/null || die "rabbitmq-server is not installed (apt-get install rabbitmq-server)"

node_name() { echo "rc$1@localhost"; }

# The environment of node $1 (server and CLI alike). Our own env file replaces
# /etc/rabbitmq/rabbitmq-env.conf, which names the main node; HOME holds our cookie.
node_env() {
    local n=$1 dir=$CLUSTER_DIR/rc$1
    export HOME=$CLUSTER_DIR/home
    export RABBITMQ_CONF_ENV_FILE=$CLUSTER_DIR/rabbitmq-env.conf
    export RABBITMQ_NODENAME=$(node_name "$n")
    export RABBITMQ_DIST_PORT=$((DIST_BASE + n))
    export RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
    export RABBITMQ_ENABLED_PLUGINS_FILE=$CLUSTER_DIR/enabled_plugins
    export RABBITMQ_MNESIA_BASE=$dir/mnesia
    export RABBITMQ_LOG_BASE=$dir/log
    export RABBITMQ_PID_FILE=$dir/pid
    export ERL_EPMD_ADDRESS=127.0.0.1
    export ERL_CRASH_DUMP=$CLUSTER_DIR/erl_crash.dump
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() {
    local n=$1
    shift
    (node_env "$n" && rabbitmqctl -n "$(node_name "$n")" "$@")
}

prepare() {
    rm -rf "$CLUSTER_DIR"
    mkdir -p "$CLUSTER_DIR/home"
    # One cookie for the three nodes and their CLI, unlike the main node's.
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$CLUSTER_DIR/home/.erlang.cookie"
    chmod 400 "$CLUSTER_DIR/home/.erlang.cookie"
    echo "[]." >"$CLUSTER_DIR/enabled_plugins"
    : >"$CLUSTER_DIR/rabbitmq-env.conf"
    # A config file of its own, or the node would read /etc/rabbitmq's and listen on 5672.
    for n in "${NODES[@]}"; do
        mkdir -p "$CLUSTER_DIR/rc$n/log"
        echo "listeners.tcp.1 = 127.0.0.1:$((AMQP_BASE + n))" >"$CLUSTER_DIR/rc$n/rabbitmq.conf"
    done
}

start_node() {
    local n=$1
    (node_env "$n" && exec setsid rabbitmq-server >"$CLUSTER_DIR/rc$n/log/console.log" 2>&1) &
}

await_node() {
    # `wait` first waits for the pid file: the start scripts take a while before the node runs.
    ctl "$1" wait --timeout 120 "$CLUSTER_DIR/rc$1/pid" >/dev/null ||
        die "node $(node_name "$1") did not start; see $CLUSTER_DIR/rc$1/log"
}

running() { ctl "$1" status >/dev/null 2>&1; }

case ${1:-} in
    start)
        for n in "${NODES[@]}"; do
            ! running "$n" || ctl "$n" stop >/dev/null
        done
        prepare
        for n in "${NODES[@]}"; do start_node "$n"; done
        for n in "${NODES[@]}"; do await_node "$n"; done
        for n in 2 3; do
            ctl "$n" stop_app >/dev/null
            ctl "$n" join_cluster "$(node_name 1)" >/dev/null
            ctl "$n" start_app >/dev/null
        done
        ctl 1 cluster_status --formatter json |
            grep -q "\"running_nodes\":\[\"rc[123]@localhost\",\"rc[123]@localhost\",\"rc[123]@localhost\"\]" ||
            die "the nodes did not cluster: $(ctl 1 cluster_status)"
        log "3 nodes clustered: amqp://guest:guest@127.0.0.1:$((AMQP_BASE + 1))..$((AMQP_BASE + 3))//"
        ;;
    stop)
        for n in "${NODES[@]}"; do
            ! running "$n" || ctl "$n" stop >/dev/null
        done
        log "stopped"
        ;;
    stop-node)
        ctl "${2:?node number}" stop >/dev/null
        ;;
    start-node)
        start_node "${2:?node number}"
        await_node "$2"
        ;;
    ctl)
        shift
        ctl "$@"
        ;;
    status)
        ctl 1 cluster_status
        ;;
    *)
        sed -n '2,12p' "$0" >&2
        exit 2
        ;;
esac
