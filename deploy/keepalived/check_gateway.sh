#!/bin/sh
# keepalived track script: is the local seckill-gateway answering /healthz?
#
# Exit 0 when GET $CHECK_URL answers 2xx within $CHECK_TIMEOUT seconds,
# exit 1 otherwise (refused, timed out, non-2xx, no HTTP client). keepalived
# runs it every `interval` seconds (see keepalived.conf); after `fall`
# failures in a row the VRRP instance goes to FAULT and gives the VIP up, so
# the peer gateway takes it.
#
# The gateway closes its listeners as soon as it gets SIGTERM (then drains
# in-flight requests for gateway.drain_secs), so `systemctl stop
# seckill-gateway` moves the VIP within about interval * fall seconds.
#
# Install: install -m 0755 -o root -g root check_gateway.sh /etc/keepalived/
# (with enable_script_security the file and every folder above it must not be
# writable by anyone but root).
#
# Environment (for tests; keepalived passes none):
#   CHECK_URL      default http://127.0.0.1:8080/healthz (gateway.listen)
#   CHECK_TIMEOUT  seconds for the whole request, default 2; keep it below
#                  the `timeout` of the vrrp_script block
set -u

url=${CHECK_URL:-http://127.0.0.1:8080/healthz}
timeout=${CHECK_TIMEOUT:-2}

if command -v curl >/dev/null 2>&1; then
    # -f: an HTTP status >= 400 is a failure; no proxy whatever the
    # environment says, the check is about this host.
    if curl -fsS --noproxy '*' -o /dev/null --connect-timeout "$timeout" \
        --max-time "$timeout" "$url" 2>/dev/null; then
        exit 0
    fi
    exit 1
fi

if command -v wget >/dev/null 2>&1; then
    # Busybox wget tries once; GNU wget retries a timed-out request 20
    # times unless told otherwise (and knows --no-proxy).
    set -- -q -O /dev/null -T "$timeout"
    case $(wget --version 2>/dev/null) in
    "GNU Wget"*) set -- "$@" --tries=1 --no-proxy ;;
    esac
    if wget "$@" "$url" 2>/dev/null; then
        exit 0
    fi
    exit 1
fi

echo "check_gateway.sh: neither curl nor wget is installed" >&2
exit 1
