"""Who holds GPU memory at the peak: replay a `torch.cuda.memory` history and list what is live at its maximum.

The bench records the allocator's history around one training step (`gpu_bench.py --memory-snapshot`); this
replays the alloc/free events in order, finds the moment the live total is highest, and groups the blocks live
then by the innermost frame that is ours (loratune, transformers, peft, torch's autograd) so a newcomer sees which
tensors make the peak. Blocks allocated before the recording started are not in the history: the bench prints their
total (weights, optimizer states) beside this table.

    python3 bench/memory_peak.py $OUT/memory_snapshot.pickle        # on a snapshot the bench wrote
"""

from __future__ import annotations

import pickle
import sys
from collections import defaultdict
from pathlib import Path

# Frames worth naming, most specific first: the first match in a block's stack (innermost first) labels it.
_OURS = ("loratune/", "transformers/", "peft/", "torch/_inductor/", "torch/autograd/", "torch/utils/checkpoint")


def _label(frames: list[dict]) -> str:
    for frame in frames:
        name = frame.get("filename", "")
        if any(key in name for key in _OURS):
            short = name.split("site-packages/")[-1].split("src/")[-1]
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{frames[0].get('filename', '?')}:{frames[0].get('line')} {frames[0].get('name')}"
    return "(no stack)"


def peak_live(snapshot: dict, device: int = 0) -> tuple[int, list[tuple[int, int, str]]]:
    """(peak bytes above the recording's start, [(bytes, blocks, label)] live at that peak, largest first)."""
    live: dict[int, tuple[int, list[dict]]] = {}
    total = best = 0
    best_live: dict[int, tuple[int, list[dict]]] = {}
    for event in snapshot["device_traces"][device]:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, event.get("frames", []))
            total += size
            if total > best:
                best, best_live = total, dict(live)
        elif action in ("free_requested", "free_completed") and addr in live:
            total -= live.pop(addr)[0]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in best_live.values():
        entry = groups[_label(frames)]
        entry[0] += size
        entry[1] += 1
    return best, sorted(((b, n, label) for label, (b, n) in groups.items()), reverse=True)


def report(snapshot: dict, top: int = 25) -> str:
    peak, rows = peak_live(snapshot)
    lines = [f"peak above the recording's start: {peak / 2**20:.1f} MiB; live then, by allocating frame:"]
    lines += [f"  {b / 2**20:8.1f} MiB  {n:4d} blocks  {label}" for b, n, label in rows[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(pickle.loads(Path(sys.argv[1]).read_bytes())))
