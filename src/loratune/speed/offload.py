"""Activation offload: the tensors the compiled layers keep for backward go to pinned CPU memory, and come back
just before the layer's backward needs them.

With recomputation inside the compiled layers (speed.compile), what a layer keeps for backward is its input: the
residual stream, [tokens x hidden] in bf16. Those inputs are what grows with the batch (32 layers x 3,600 tokens
x 2,560 x 2 bytes = 0.55 GiB for Phi-2 at its longest micro-batch); the rest of the peak is weights, LoRA states and
one layer's recomputation. Unsloth's "unsloth" checkpointing moves them to the CPU the same way.

How: a `saved_tensors_hooks` pair around the decoder body. AOTAutograd's compiled function saves its tensors with
`save_for_backward`, so the hooks see exactly those tensors (plain Python hooks are not traced; Dynamo guards on
them not being inlineable, which does not change between steps).
- pack: tensors shaped like the residual stream ([..., hidden], floating, contiguous, >= 1 MiB) that are not
  parameters or buffers (so not the 4-bit or LoRA weights, nor the rotary tables every layer shares) are copied
  into pinned host memory on a side stream (`non_blocking`), and the GPU block is handed back to the allocator
  once that copy is done (`record_stream`), while the next layer computes. The host buffers are pinned once per
  position in the layer order and reused at every step (a pinned allocation costs milliseconds).
- unpack: backward runs the layers in reverse, so when a layer asks for its input, the copy back of the layer
  before it is started on another side stream (prefetch one ahead); the compute stream waits only for the copy
  it needs, which was issued one layer earlier.

What it costs (H100, bench/NOTES.md entry 15): Phi-2 -0.33 GiB peak and 17% of the step time, Llama ~1B -0.17 GiB
and 4.5%. The time is the hooks themselves: they run for every tensor a compiled layer saves, its 4-bit and LoRA
weights included (~70 per layer, ~2,300 Python calls per Phi-2 step each way), not the copies, which overlap.
On the CPU (no separate memory) it is not applied; `HostOffload(device_copy=False)` exercises the same selection
and ordering in tests with plain copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors (segment boundaries, norms' statistics) stay where they are


class _Packed:
    """A saved tensor on the host, and its copy back (started by a prefetch or by its own unpack)."""

    __slots__ = ("host", "device", "stored", "back", "ready", "slot", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, stored: Any, slot: int = -1) -> None:
        self.host, self.device, self.stored, self.slot = host, device, stored, slot
        self.back: torch.Tensor | None = None
        self.ready: Any = None  # CUDA event recorded after the copy back


class HostOffload:
    """Saved-tensor hooks that move large activations to host memory (pinned, asynchronous on CUDA)."""

    def __init__(self, model: torch.nn.Module, width: int, *, min_bytes: int = MIN_BYTES,
                 device_copy: bool = True) -> None:
        self.width = width  # the residual stream's last dimension (hidden size)
        self.min_bytes = min_bytes
        self.device_copy = device_copy
        self.model = model
        self._skip: set[int] | None = None
        self._order: list[_Packed] = []  # this forward's packed tensors, in pack order
        self.offloaded_bytes = 0  # in total, for tests and the bench
        self._down = self._up = None
        # Pinned host buffers, one per position in the pack order, reused across steps. (buffer, its current owner)
        self._slots: list[tuple[torch.Tensor, Callable[[], Any]]] = []
        self._last_read: dict[int, Any] = {}  # slot -> event after its latest copy back

    # -- which tensors ---------------------------------------------------------------------------------------
    def _storage_ptrs(self) -> set[int]:
        if self._skip is None:  # built at the first pack: the model's tensors are final by then
            tensors = [*self.model.parameters(), *self.model.buffers()]
            self._skip = {t.untyped_storage().data_ptr() for t in tensors}
        return self._skip

    def _eligible(self, t: torch.Tensor) -> bool:
        # Contiguous only: the compiled backward checks its inputs' strides, and the copy back is contiguous.
        return (t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == self.width and t.is_contiguous()
                and not isinstance(t, torch.nn.Parameter) and t.numel() * t.element_size() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in self._storage_ptrs())

    # -- hooks -----------------------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> Any:
        if not self._eligible(t):
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        if not (self.device_copy and t.is_cuda):
            packed = _Packed(t.detach().clone(), t.device, None)
        else:
            if self._down is None:
                self._down, self._up = torch.cuda.Stream(t.device), torch.cuda.Stream(t.device)
            slot = len(self._order)
            host = self._host_view(slot, t)
            self._down.wait_stream(torch.cuda.current_stream(t.device))  # t is complete
            with torch.cuda.stream(self._down):
                if slot in self._last_read:  # the buffer's previous contents have been copied back
                    self._down.wait_event(self._last_read[slot])
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            t.record_stream(self._down)  # the block is reused only after the copy has read it
            packed = _Packed(host, t.device, done, slot)
            self._slots[slot] = (self._slots[slot][0], weakref.ref(packed))
        self._order.append(packed)
        return packed

    def _host_view(self, slot: int, t: torch.Tensor) -> torch.Tensor:
        """Slot `slot`'s pinned buffer viewed as t's shape; a new buffer if it is too small or still held by a
        graph that was never backpropagated (its owner is alive)."""
        nbytes = t.numel() * t.element_size()
        if slot == len(self._slots):
            self._slots.append((torch.empty(0, dtype=torch.uint8), lambda: None))
        buf, owner = self._slots[slot]
        if buf.numel() < nbytes or owner() is not None:
            size = 1 << (nbytes - 1).bit_length()  # a power of two: few regrowths as packed lengths vary
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._slots[slot] = (buf, owner)
            self._last_read.pop(slot, None)
        return buf[:nbytes].view(t.dtype).view(t.shape)

    def _start_copy_back(self, p: _Packed) -> None:
        if p.back is not None:
            return
        if p.stored is None:  # the host stand-in (CPU tensors, tests)
            p.back = p.host.to(p.device)
            return
        with torch.cuda.stream(self._up):
            self._up.wait_event(p.stored)  # the copy down of this tensor has finished
            p.back = p.host.to(p.device, non_blocking=True)
            p.ready = torch.cuda.Event()
            p.ready.record()
        self._last_read[p.slot] = p.ready

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        self._start_copy_back(packed)
        try:  # prefetch the tensor backward will ask for next: the one packed just before this one
            i = self._order.index(packed)
        except ValueError:
            i = 0
        if i > 0:
            self._start_copy_back(self._order[i - 1])
        out = packed.back
        if packed.ready is not None:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.ready)
            out.record_stream(current)  # allocated on the copy stream, used and freed on this one
        packed.back = packed.ready = None  # the host copy stays (a second backward with retain_graph)
        return out

    def context(self) -> AbstractContextManager:
        """The hooks for one forward pass (a new pack order each time)."""
        self._order = []
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def offload_context(offload: HostOffload | None, training: bool) -> AbstractContextManager:
    return offload.context() if offload is not None and training and torch.is_grad_enabled() else nullcontext()
