"""The optimizer update (gradient clipping, AdamW, zeroing the gradients) as one CUDA graph.

Why: once the micro-batch replays as a CUDA graph (speed.graphs), the update after it is the next largest cost of a
step, and it is the CPU's: clip_grad_norm_, the fused AdamW and zero_grad issue a few dozen launches over the
~200-400 LoRA tensors, and the GPU waits for them. Measured on an H100 with CUDA events: 11.1 ms of a 134.6 ms Phi-2
step and 13 ms of a Llama ~1B step, against ~1 ms of GPU work (bench/NOTES.md entry 24). Recorded once, the update
is one replay.

What makes that exact:
- the learning rate lives in a device tensor per parameter group, so the schedule's changes reach the replays:
  torch's schedulers `fill_` a tensor learning rate in place, and a float written over it (an older torch, or
  anything else) is copied into the recorded tensor before the next replay;
- AdamW keeps its step count on the device (fused, or `capturable`), so bias correction advances in the replay;
- gradients are zeroed in place, so the next backward (and speed.graphs' recordings) add into the same tensors; if
  the `.grad` or parameter tensors change (a `set_to_none`), or the optimizer's state is replaced (a
  `load_state_dict`), the update is recorded again.
The first update runs eagerly (it creates AdamW's state) and is recorded after it; later ones replay.

Only torch's AdamW/Adam in their fused or capturable form qualify (bitsandbytes' 8-bit optimizers keep the step
count on the host); anything else runs eagerly. `record=False` runs the same body eagerly every time, so the CPU
tests cover the tensor learning rate and the in-place zeroing.
"""

from __future__ import annotations

from typing import Any

import torch


def recordable(optimizer: Any) -> bool:
    """torch's Adam/AdamW with a device-side step count, over CUDA parameters only."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    groups = optimizer.param_groups
    return all((g.get("fused") or g.get("capturable")) and not g.get("differentiable")
               and all(p.is_cuda for p in g["params"]) for g in groups)


class OptimizerStep:
    """`clip_grad_norm_` (if `max_grad_norm`) + `optimizer.step()` + `zero_grad`, recorded as a CUDA graph when
    `graphs` is on and the optimizer qualifies; `keep_grads` zeroes in place instead of setting `.grad` to None (it
    is implied by `graphs`, whose recordings add into fixed gradient tensors)."""

    def __init__(self, optimizer: Any, params: list[torch.Tensor], max_grad_norm: float | None, *,
                 graphs: bool = False, keep_grads: bool = False, record: bool = True):
        self.optimizer = optimizer
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.graphs = graphs and (recordable(optimizer) or not record)
        self.keep_grads = keep_grads or self.graphs
        self.record = record
        self.graph: Any = None
        self.replays = 0
        self._lrs: list[torch.Tensor] = []
        self._ptrs: list[int] = []
        self._state: Any = None

    def __call__(self) -> None:
        if not self.graphs:
            self._body()
            return
        self._sync_lrs()
        if self.graph is not None and self._ptrs == self._pointers() and self._state is self.optimizer.state:
            self.graph.replay()
            self.replays += 1
            return
        self.graph = None
        if not self.record:
            self._body()
            return
        # The first update (and one after the tensors changed) runs eagerly on a side stream, which creates
        # AdamW's state outside any recording; the recording then executes nothing.
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._body()
        current.wait_stream(side)
        # torch refuses to record a step without `capturable`; it is set for the recording only, so that checkpoints
        # keep the user's setting (a GPU checkpoint may be resumed on the CPU, where capturable is refused).
        flags = [group.get("capturable", False) for group in self.optimizer.param_groups]
        graph = torch.cuda.CUDAGraph()
        try:
            for group in self.optimizer.param_groups:
                group["capturable"] = True
            with torch.cuda.graph(graph):
                self._body()
        finally:
            for group, flag in zip(self.optimizer.param_groups, flags):
                group["capturable"] = flag
        self.graph = graph
        self._ptrs = self._pointers()
        self._state = self.optimizer.state  # load_state_dict builds a new one (new moment tensors)

    def _body(self) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)

    def _sync_lrs(self) -> None:
        """Every group's learning rate as this object's device tensor, holding the group's current value."""
        groups = self.optimizer.param_groups
        if len(self._lrs) != len(groups):
            device = groups[0]["params"][0].device
            self._lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in groups]
            self.graph = None
        for group, lr in zip(groups, self._lrs):
            if group["lr"] is not lr:  # a scheduler wrote a float (or another tensor) over it
                lr.fill_(float(group["lr"]))
                group["lr"] = lr

    def _pointers(self) -> list[int]:
        return [p.data_ptr() for p in self.params] + [p.grad.data_ptr() if p.grad is not None else 0
                                                      for p in self.params]


def last_lr(scheduler: Any) -> float:
    """The scheduler's current learning rate as a float (it is a tensor once the update is recorded)."""
    return float(scheduler.get_last_lr()[0])
