# shellcheck shell=bash
#
# The browser the storefront and dashboard tests drive
# (gateway/tests/browser.rs, through Playwright from the API tools venv):
# Debian's chromium, with chromium-driver for WebDriver clients and a font
# so pages render text.
#
#   ensure_chromium   installs them when missing and exports
#                     SECKILL_CHROMIUM (the browser's path)
#
# Idempotent; a warm call takes milliseconds.

_browser_tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# shellcheck source=scripts/lib/services.sh
source "$_browser_tools_root/scripts/lib/services.sh"

ensure_chromium() {
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
        || [[ ! -d /usr/share/fonts/truetype/dejavu ]]; then
        echo "installing chromium for the browser tests" >&2
        apt_install chromium chromium-driver fonts-dejavu-core || return 1
    fi
    SECKILL_CHROMIUM=$(command -v chromium)
    export SECKILL_CHROMIUM
}
