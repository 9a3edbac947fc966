#!/usr/bin/env bash
# Debian's chromium for the browser test (tests/test_web_ui.py drives it through Playwright's Python package,
# never `playwright install`). Idempotent and quiet: does nothing when chromium is already there. It never fails
# `make test`: without root or apt the browser test skips and says why.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; tests/test_web_ui.py will be skipped" >&2
  exit 0
fi
run=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run="sudo -n"
  else
    echo "install-browser: not root and no passwordless sudo; tests/test_web_ui.py will be skipped" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $run apt-get update -qq >/dev/null && $run apt-get install -y -qq chromium >/dev/null; }; then
  echo "install-browser: apt-get could not install chromium; tests/test_web_ui.py will be skipped" >&2
fi
exit 0
