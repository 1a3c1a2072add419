# shellcheck shell=bash
#
# The Python tools the end-to-end tests run against the stack:
# schemathesis and openapi-python-client (gateway/tests/api_contract.rs)
# and Playwright (gateway/tests/browser.rs, with the chromium of
# scripts/lib/browser_tools.sh), pinned in
# scripts/api-contract/requirements.txt, in their own venv.
#
#   ensure_api_contract_tools   makes or refreshes the venv and exports
#                               SECKILL_API_TOOLS (its path)
#
# Idempotent: the venv is rebuilt only when requirements.txt changed (its
# sha256 is stamped inside), so a warm call takes milliseconds. Needs
# python3 with venv and pip (python3-venv on Debian: installed when missing).
#
# Tunables (environment):
#   SECKILL_API_TOOLS   where the venv lives (default <repo>/target/api-tools)

_api_tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# shellcheck source=scripts/lib/services.sh
source "$_api_tools_root/scripts/lib/services.sh"

ensure_api_contract_tools() {
    local requirements="$_api_tools_root/scripts/api-contract/requirements.txt"
    local venv=${SECKILL_API_TOOLS:-${CARGO_TARGET_DIR:-$_api_tools_root/target}/api-tools}
    local want stamp="$venv/.requirements.sha256"
    want=$(sha256sum "$requirements" | cut -d' ' -f1)
    if [[ -x $venv/bin/schemathesis && -x $venv/bin/playwright && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        export SECKILL_API_TOOLS=$venv
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-venv || return 1
    fi
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv || return 1
    fi
    echo "preparing the API contract tools in $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || {
        svc_err "python3 -m venv $venv failed"
        return 1
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2 || {
        svc_err "pip install -r $requirements failed"
        return 1
    }
    printf '%s\n' "$want" >"$stamp"
    export SECKILL_API_TOOLS=$venv
}
