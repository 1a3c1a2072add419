# shellcheck shell=bash
#
# Helpers shared by scripts/up and scripts/test: make sure the build tools,
# the Rust toolchain and the three backing services (MariaDB, Redis,
# RabbitMQ on 127.0.0.1) are present and answering.
#
# Source this file; it defines functions only and changes no shell options.
# Every ensure_* function is idempotent: a service that already answers is
# used as it is, whoever started it. Nothing here assumes systemd: servers are
# started directly in the background. Installation uses apt-get (Debian and
# Ubuntu), through sudo when not running as root.
#
# Functions return non-zero (after printing why on stderr) instead of
# exiting, so callers decide; under `set -e` a failing call stops the caller.
#
#   ensure_build_tools   cmake, pkg-config, cc/c++/make, curl
#   ensure_rust          cargo (via rustup when missing), rustfmt, clippy
#   ensure_services      redis, mariadb, rabbitmq (installs missing ones once)
#   ensure_redis / ensure_mariadb / ensure_rabbitmq
#
# Tunables (environment):
#   SECKILL_SERVICE_TIMEOUT   seconds to wait for Redis/MariaDB (default 60)
#   SECKILL_RABBITMQ_TIMEOUT  seconds to wait for RabbitMQ (default 90)

SVC_HOST=127.0.0.1
SVC_REDIS_PORT=6379
SVC_MARIADB_PORT=3306
SVC_RABBITMQ_PORT=5672
SVC_MARIADBD=/usr/sbin/mariadbd

_svc_apt_updated=0

svc_err() {
    printf '%s\n' "error: $*" >&2
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        svc_err "need root for: $* (run as root or install sudo)"
        return 1
    fi
}

# apt_install PKG...: apt-get update (once per run), then install.
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        svc_err "apt-get not found; install these packages by hand: $*"
        return 1
    fi
    if [[ $_svc_apt_updated -eq 0 ]]; then
        echo "apt-get update" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || {
            svc_err "apt-get update failed"
            return 1
        }
        _svc_apt_updated=1
    fi
    echo "apt-get install $*" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 || {
        svc_err "apt-get install $* failed"
        return 1
    }
}

# tcp_open HOST PORT: true when something accepts a TCP connection there.
tcp_open() {
    # shellcheck disable=SC2016 # $1 and $2 belong to the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# _svc_wait TIMEOUT CHECK_FN: polls CHECK_FN once a second until it
# succeeds (return 0) or TIMEOUT seconds pass (return 1).
_svc_wait() {
    local timeout=$1 check=$2
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if "$check"; then
            return 0
        fi
        sleep 1
    done
    "$check"
}

# svc_pgrep PGREP_ARGS...: like `pgrep -q`, ignoring zombies (a container
# whose init does not reap keeps exited servers around as <defunct>).
svc_pgrep() {
    local pid state
    for pid in $(pgrep "$@" 2>/dev/null); do
        state=$(ps -o stat= -p "$pid" 2>/dev/null) || continue
        [[ $state == Z* ]] || return 0
    done
    return 1
}

# _svc_tail FILE...: shows the end of the first readable log file given.
_svc_tail() {
    local f
    for f in "$@"; do
        if as_root test -s "$f" 2>/dev/null; then
            echo "--- last lines of $f ---" >&2
            as_root tail -n 20 "$f" >&2 || true
            return 0
        fi
    done
}

# ---------------------------------------------------------------- build tools

ensure_build_tools() {
    local missing=() tool
    for tool in cmake pkg-config cc c++ make; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            missing+=("$tool")
        fi
    done
    local pkgs=()
    if ((${#missing[@]})); then
        echo "build tools missing: ${missing[*]}" >&2
        pkgs+=(cmake pkg-config build-essential)
    fi
    if ! command -v curl >/dev/null 2>&1; then
        pkgs+=(curl ca-certificates)
    fi
    if ((${#pkgs[@]})); then
        apt_install "${pkgs[@]}" || return 1
    fi
}

# Cargo from rustup (Debian's packaged rustc is older than the workspace's
# rust-version). Installs rustup for the current user only when no cargo is
# found at all; then makes sure rustfmt and clippy are there.
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        PATH="$HOME/.cargo/bin:$PATH"
        export PATH
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: installing the Rust toolchain with rustup (https://rustup.rs)" >&2
        command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates || return 1
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --component rustfmt,clippy >&2 || {
            svc_err "rustup installation failed"
            return 1
        }
        PATH="$HOME/.cargo/bin:$PATH"
        export PATH
    fi
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            echo "rustup component add rustfmt clippy" >&2
            rustup component add rustfmt clippy >&2 || {
                svc_err "could not add rustfmt/clippy with rustup"
                return 1
            }
        else
            svc_err "cargo fmt / cargo clippy are missing and rustup is not installed"
            return 1
        fi
    fi
}

# ---------------------------------------------------------------------- redis

redis_ok() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ $(timeout 5 redis-cli -h "$SVC_HOST" -p "$SVC_REDIS_PORT" ping 2>/dev/null) == PONG ]]
    else
        tcp_open "$SVC_HOST" "$SVC_REDIS_PORT"
    fi
}

_redis_installed() { command -v redis-server >/dev/null 2>&1; }

_redis_start() {
    as_root mkdir -p /var/lib/redis /var/log/redis || return 1
    # Redis 7 accepts "-addr" for an optional address (no IPv6 is fine).
    local bind=(127.0.0.1)
    if [[ $(redis-server --version 2>/dev/null) =~ v=([0-9]+) ]] && ((BASH_REMATCH[1] >= 7)); then
        bind+=(-::1)
    fi
    as_root redis-server --daemonize yes --bind "${bind[@]}" --port "$SVC_REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

ensure_redis() {
    local timeout=${SECKILL_SERVICE_TIMEOUT:-60}
    if redis_ok; then
        echo "redis: running"
        return 0
    fi
    if ! _redis_installed; then
        apt_install redis-server || return 1
        # The package's own start-up (where there is one) may be under way.
        if _svc_wait 5 redis_ok; then
            echo "redis: installed and running"
            return 0
        fi
    fi
    if svc_pgrep -x redis-server; then
        # Starting or shutting down: give it a moment before starting another.
        _svc_wait 10 redis_ok && { echo "redis: running"; return 0; }
        if svc_pgrep -x redis-server; then
            svc_err "redis: a redis-server process exists but $SVC_HOST:$SVC_REDIS_PORT does not answer"
            _svc_tail /var/log/redis/ci.log /var/log/redis/redis-server.log
            return 1
        fi
    fi
    _redis_start || {
        svc_err "redis: redis-server failed to start"
        _svc_tail /var/log/redis/ci.log
        return 1
    }
    if ! _svc_wait "$timeout" redis_ok; then
        svc_err "redis: not answering on $SVC_HOST:$SVC_REDIS_PORT after ${timeout}s"
        _svc_tail /var/log/redis/ci.log
        return 1
    fi
    echo "redis: started"
}

# -------------------------------------------------------------------- mariadb

_mariadb_client() {
    if command -v mariadb >/dev/null 2>&1; then
        echo mariadb
    else
        echo mysql
    fi
}

# What the application and the tests need: root, empty password, over TCP.
mariadb_ok() {
    command -v "$(_mariadb_client)" >/dev/null 2>&1 || return 1
    timeout 10 "$(_mariadb_client)" --connect-timeout=3 -h"$SVC_HOST" -P"$SVC_MARIADB_PORT" \
        -uroot -e 'select 1' >/dev/null 2>&1
}

_mariadb_port_open() { tcp_open "$SVC_HOST" "$SVC_MARIADB_PORT"; }

_mariadb_installed() { [[ -x $SVC_MARIADBD ]]; }

_mariadb_start() {
    as_root mkdir -p /run/mysqld /var/log/mysql || return 1
    as_root chown mysql:mysql /run/mysqld || return 1
    local out=()
    # --output (dpkg >= 1.20.6) keeps what mariadbd prints when no log_error
    # is configured (Debian's default relies on the journal otherwise).
    if [[ $(start-stop-daemon --help 2>&1) == *--output* ]]; then
        out=(--output /var/log/mysql/ci-stdout.log)
    fi
    as_root start-stop-daemon --start --oknodo --background "${out[@]}" \
        --exec "$SVC_MARIADBD" -- --user=mysql
}

# A fresh Debian/Ubuntu install authenticates root@localhost by unix_socket
# only, so the TCP login as root with an empty password that the config uses
# is refused. Over the local socket (as the OS root user), allow it from
# 127.0.0.1. DEVELOPMENT MACHINE ONLY: this gives passwordless root to
# anything that can connect to 127.0.0.1:3306.
_mariadb_fix_root_tcp() {
    echo "mariadb: allowing root with an empty password from 127.0.0.1 (dev machine only)" >&2
    as_root "$(_mariadb_client)" -uroot -e "
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
        GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
        FLUSH PRIVILEGES;" || return 1
    mariadb_ok && return 0
    # Without skip-name-resolve, 127.0.0.1 may resolve to 'localhost' and
    # still hit root@localhost: let that account accept the empty password
    # too, keeping socket login.
    echo "mariadb: also allowing root@localhost with an empty password (dev machine only)" >&2
    as_root "$(_mariadb_client)" -uroot -e "
        ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('');
        FLUSH PRIVILEGES;" || return 1
    mariadb_ok
}

# After the port answers: the root login may still need the fix above.
_mariadb_ready() {
    if mariadb_ok; then
        return 0
    fi
    if _mariadb_fix_root_tcp && mariadb_ok; then
        return 0
    fi
    svc_err "mariadb: $SVC_HOST:$SVC_MARIADB_PORT answers but 'root' with an empty password cannot log in"
    return 1
}

ensure_mariadb() {
    local timeout=${SECKILL_SERVICE_TIMEOUT:-60}
    if mariadb_ok; then
        echo "mariadb: running"
        return 0
    fi
    if _mariadb_port_open; then
        _mariadb_ready || return 1
        echo "mariadb: running"
        return 0
    fi
    if ! _mariadb_installed; then
        apt_install mariadb-server || return 1
        if _svc_wait 5 _mariadb_port_open; then
            _mariadb_ready || return 1
            echo "mariadb: installed and running"
            return 0
        fi
    fi
    if svc_pgrep -x mariadbd; then
        # Starting (crash recovery can take a while) or shutting down.
        if _svc_wait 20 _mariadb_port_open; then
            _mariadb_ready || return 1
            echo "mariadb: running"
            return 0
        fi
        if svc_pgrep -x mariadbd; then
            svc_err "mariadb: a mariadbd process exists but $SVC_HOST:$SVC_MARIADB_PORT does not answer"
            _svc_tail /var/log/mysql/error.log /var/log/mysql/ci-stdout.log
            return 1
        fi
    fi
    _mariadb_start || {
        svc_err "mariadb: start-stop-daemon failed"
        return 1
    }
    if ! _svc_wait "$timeout" _mariadb_port_open; then
        svc_err "mariadb: not answering on $SVC_HOST:$SVC_MARIADB_PORT after ${timeout}s"
        _svc_tail /var/log/mysql/error.log /var/log/mysql/ci-stdout.log
        return 1
    fi
    _mariadb_ready || return 1
    echo "mariadb: started"
}

# ------------------------------------------------------------------- rabbitmq

rabbitmq_ok() { tcp_open "$SVC_HOST" "$SVC_RABBITMQ_PORT"; }

_rabbitmq_installed() { command -v rabbitmq-server >/dev/null 2>&1 || [[ -x /usr/sbin/rabbitmq-server ]]; }

_rabbitmq_running() { svc_pgrep -f 'beam.*-s rabbit boot'; }

_rabbitmq_logs() {
    _svc_tail /var/log/rabbitmq/ci-start.log
    local f
    for f in /var/log/rabbitmq/rabbit@*.log; do
        [[ $f == *_upgrade.log ]] || _svc_tail "$f"
    done
}

_rabbitmq_start() {
    as_root mkdir -p /var/log/rabbitmq || return 1
    # The Debian wrapper switches to the rabbitmq user. Its output goes to a
    # file so the detached node never holds our stdout (a pipe) open.
    # shellcheck disable=SC2016 # expanded by the inner sh, as root
    as_root sh -c 'PATH="$PATH:/usr/sbin"; rabbitmq-server -detached >>/var/log/rabbitmq/ci-start.log 2>&1 </dev/null'
}

ensure_rabbitmq() {
    local timeout=${SECKILL_RABBITMQ_TIMEOUT:-90}
    if rabbitmq_ok; then
        echo "rabbitmq: running"
        return 0
    fi
    if ! _rabbitmq_installed; then
        apt_install rabbitmq-server || return 1
        if _svc_wait 5 rabbitmq_ok; then
            echo "rabbitmq: installed and running"
            return 0
        fi
    fi
    if _rabbitmq_running; then
        # Booting (takes 10-30 s) or stopping: wait for it before deciding.
        if _svc_wait "$timeout" rabbitmq_ok; then
            echo "rabbitmq: running"
            return 0
        fi
        if _rabbitmq_running; then
            svc_err "rabbitmq: a RabbitMQ node is running but $SVC_HOST:$SVC_RABBITMQ_PORT does not answer after ${timeout}s"
            _rabbitmq_logs
            return 1
        fi
    fi
    _rabbitmq_start || {
        svc_err "rabbitmq: rabbitmq-server -detached failed"
        _rabbitmq_logs
        return 1
    }
    if ! _svc_wait "$timeout" rabbitmq_ok; then
        svc_err "rabbitmq: not answering on $SVC_HOST:$SVC_RABBITMQ_PORT after ${timeout}s"
        _rabbitmq_logs
        return 1
    fi
    echo "rabbitmq: started"
}

# ---------------------------------------------------------------------- all

# Installs every missing server package in one apt-get run, then makes sure
# each service answers.
ensure_services() {
    local pkgs=()
    redis_ok || _redis_installed || pkgs+=(redis-server)
    mariadb_ok || _mariadb_port_open || _mariadb_installed || pkgs+=(mariadb-server)
    rabbitmq_ok || _rabbitmq_installed || pkgs+=(rabbitmq-server)
    if ((${#pkgs[@]})); then
        apt_install "${pkgs[@]}" || return 1
    fi
    ensure_redis || return 1
    ensure_mariadb || return 1
    ensure_rabbitmq || return 1
}
