"""bench/memory_peak.py: the live set at the peak of an allocator history, grouped by the allocating frame."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("memory_peak", Path(__file__).parents[1] / "bench" / "memory_peak.py")
memory_peak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_peak)


def _event(action: str, addr: int, size: int, where: str = "") -> dict:
    frames = [{"filename": "/tmp/torchinductor_x/abc.py", "line": 7, "name": "call"}]
    if where:
        frames.append({"filename": f"/site-packages/loratune/{where}", "line": 3, "name": "f"})
    return {"action": action, "addr": addr, "size": size, "frames": frames}


def test_peak_is_the_largest_live_total_and_names_our_frames():
    """Blocks freed before the peak do not count, a block freed after it does; a block whose stack passes through
    our code is named by that frame (the innermost one is Inductor's generated file)."""
    trace = [
        _event("alloc", 1, 100, "speed/lora.py"),
        _event("free_requested", 1, 100),
        _event("free_completed", 1, 100),
        _event("alloc", 2, 300, "speed/nf4.py"),
        _event("alloc", 3, 50, "speed/lora.py"),  # live total 350: the peak
        _event("free_requested", 2, 300),
        _event("alloc", 4, 200, "speed/lora.py"),  # 250: below the peak
    ]
    peak, rows = memory_peak.peak_live({"device_traces": [trace]})
    assert peak == 350
    assert [(b, n) for b, n, _ in rows] == [(300, 1), (50, 1)]
    assert rows[0][2].startswith("loratune/speed/nf4.py:3") and rows[1][2].startswith("loratune/speed/lora.py:3")
    assert "loratune/speed/nf4.py:3" in memory_peak.report({"device_traces": [trace]}).splitlines()[1]
