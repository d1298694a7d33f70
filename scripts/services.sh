#!/usr/bin/env bash
# Make PostgreSQL, Redis and RabbitMQ reachable on 127.0.0.1 for the test suite.
# Usage: scripts/services.sh [postgres|redis|rabbitmq ...]   (default: all)
set -euo pipefail

# rabbitmq-server and pg_ctlcluster live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { echo "services: $*"; }
err() { echo "services: ERROR: $*" >&2; }

port_open() {
    # `timeout` guards against a filtered port hanging the connect.
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

apt_updated=0
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        err "package '$1' is not installed and we are not root; install it with: apt-get install $1"
        return 1
    fi
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    log "installing $1"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

# Per service: port, Debian package, "is it installed" check, start command, wait budget (s).
svc_port()    { case $1 in postgres) echo 5432;; redis) echo 6379;; rabbitmq) echo 5672;; esac; }
svc_package() { case $1 in postgres) echo postgresql;; redis) echo redis-server;; rabbitmq) echo rabbitmq-server;; esac; }
svc_timeout() { case $1 in postgres) echo 30;; redis) echo 15;; rabbitmq) echo 60;; esac; }

svc_installed() {
    case $1 in
        postgres) command -v pg_ctlcluster >/dev/null && [ -n "$(ls /etc/postgresql 2>/dev/null)" ] ;;
        redis)    command -v redis-server >/dev/null ;;
        rabbitmq) command -v rabbitmq-server >/dev/null ;;
    esac
}

svc_start() {
    case $1 in
        postgres)
            pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start ;;
        redis)
            # A fresh install may not have created these yet if its postinst was skipped.
            mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
            redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
                --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log ;;
        rabbitmq)
            rabbitmq-server -detached ;;
    esac
}

# Debian's fresh cluster uses peer/scram auth; the tests connect without a password.
pg_trust_auth() {
    local hba
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
        printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' >"$hba"
    done
}

# Fails if the service cannot be started; appends it to `pending` if it must be waited for.
pending=()
ensure() {
    local name=$1 port pkg
    port=$(svc_port "$name")
    pkg=$(svc_package "$name")
    if port_open "$port"; then
        log "$name already up on :$port"
        return 0
    fi
    if ! svc_installed "$name"; then
        apt_install "$pkg" || return 1
        if [ "$name" = postgres ]; then pg_trust_auth; fi
        # The package's postinst may have started it already (where policy-rc.d allows).
        if port_open "$port"; then
            if [ "$name" = postgres ]; then
                pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main reload
            fi
            pending+=("$name")
            return 0
        fi
    fi
    log "starting $name"
    if ! svc_start "$name"; then
        err "could not start $name (package $pkg)"
        return 1
    fi
    pending+=("$name")
}

wait_up() {
    wait_port "$1" "$(svc_port "$1")" "$(svc_timeout "$1")"
}

# Waits (bounded) until `label` answers on `port`.
wait_port() {
    local label=$1 port=$2 budget=$3 tries
    tries=$((budget * 2))
    until port_open "$port"; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            err "$label did not answer on 127.0.0.1:$port within ${budget}s"
            return 1
        fi
        sleep 0.5
    done
    log "$label up on :$port"
}

main() {
    local services=("$@") name failed=()
    [ ${#services[@]} -eq 0 ] && services=(postgres redis rabbitmq)
    for name in "${services[@]}"; do
        if [ -z "$(svc_port "$name")" ]; then
            err "unknown service '$name' (expected: postgres redis rabbitmq)"
            exit 2
        fi
    done

    # Start everything before waiting, so slow boots (RabbitMQ) overlap.
    for name in "${services[@]}"; do
        ensure "$name" || failed+=("$name")
    done
    for name in "${pending[@]}"; do
        wait_up "$name" || failed+=("$name")
    done

    if [[ " ${services[*]} " == *" rabbitmq "* ]] && [[ " ${failed[*]} " != *" rabbitmq "* ]]; then
        rabbitmq_management || failed+=("rabbitmq_management")
    fi

    if [ ${#failed[@]} -gt 0 ]; then
        err "not available: ${failed[*]}"
        exit 1
    fi
}

# RabbitMQ's management API (GET /queues reads unacked counts and rates from it when
# `broker_api` is set; the web tests use it): the plugin ships with rabbitmq-server.
rabbitmq_management() {
    if port_open 15672; then
        log "rabbitmq management API already up on :15672"
        return 0
    fi
    log "enabling rabbitmq_management"
    if ! rabbitmq-plugins enable rabbitmq_management >/dev/null; then
        err "cannot enable RabbitMQ's management plugin; as root: rabbitmq-plugins enable rabbitmq_management"
        return 1
    fi
    wait_port "rabbitmq management API" 15672 30
}

main "$@"
