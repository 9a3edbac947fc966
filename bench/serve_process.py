"""Start `loratune serve` in a subprocess on a free loopback port and wait until /health answers.

Shared by bench/load_test.py and bench/soak_test.py (imported from the bench folder, which is on sys.path when a
script there is run as `python bench/NAME.py`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def start_serve(base: str, serve_args: list[str], *, env: dict[str, str] | None = None,
                timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a running server for `base`; exits with the server's stderr if it dies first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loratune.cli", "serve", base, "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start within {timeout_s:.0f} s")
