"""Activation offload: each compiled layer's input goes to pinned CPU memory after the layer's forward, and comes
back just before the layer's backward needs it.

With recomputation inside the compiled layers (speed.compile), what a layer keeps for backward is its input: the
residual stream, [tokens x hidden] in bf16. Those inputs are what grows with the batch (32 layers x 3,600 tokens
x 2,560 x 2 bytes = 0.55 GiB for Phi-2 at its longest micro-batch); the rest of the peak is weights, LoRA states and
one layer's recomputation. Unsloth's "unsloth" checkpointing moves them to the CPU the same way.

How, with two Python calls per layer and step (no saved-tensor hooks):
- after a layer's forward, its input is copied into a pinned host buffer on a side stream; after the next layer's
  forward is issued, the compute stream waits for that copy and the input's storage is resized to 0 bytes. The
  compiled backward holds that same storage among its saved tensors, so the GPU block goes back to the allocator.
- a hook on the layer *output*'s gradient fires just before the layer's backward: the storage is resized back and
  refilled from the host (the alias written to is a separate tensor, so the saved tensor's version does not
  change), and the copy of the layer below is started on another side stream (prefetch one ahead). The compute
  stream waits only for the copy it needs, which was issued one layer earlier. Once restored, the storage is owned
  by autograd alone and is freed after the layer's backward.
The host buffers are pinned once per layer position and reused at every step (a pinned allocation costs
milliseconds).

Why not `saved_tensors_hooks` (the first version, bench/NOTES.md entries 14-15): they are called for every tensor
a compiled layer saves, its 4-bit and LoRA weights included (~70 per layer, ~2,300 Python calls per Phi-2 step
each way), and saving through Python hooks slowed AOTAutograd's own bookkeeping: 17% of Phi-2's step time.

Inside a CUDA-graph recording (speed.graphs) the same calls are recorded: the copies become graph nodes on forked
streams, the storage resizes allocate from and return to the graph's memory pool, and the host buffers a
recording used are kept alive by it.

Only a layer input that owns its whole storage is moved (not a view, not a parameter, at least `min_bytes`):
resizing a shared storage would pull memory from under other tensors. The first layer's input is the embedding
output, a leaf that requires grad when peft's `enable_input_require_grads` hook made it one; it is moved too, which
is safe because the loss passes token ids (never caller-owned `inputs_embeds`) and nothing else reads it. On the CPU (no separate memory) it is not
applied; `HostOffload(device_copy=False)` exercises the same resize and restore with plain copies in tests.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller inputs (tiny batches) are not worth a copy


class _Stash:
    """One layer input between forward and backward: its storage (0 bytes while away), and its host copy."""

    __slots__ = ("storage", "nbytes", "device", "host", "stored", "ready", "slot", "order", "__weakref__")

    def __init__(self, storage: torch.UntypedStorage, device: torch.device, slot: int, order: list) -> None:
        self.storage: torch.UntypedStorage | None = storage  # None once restored (autograd owns it again)
        self.nbytes = storage.nbytes()
        self.device, self.slot, self.order = device, slot, order
        self.host: torch.Tensor | None = None
        self.stored: Any = None  # CUDA event after the copy down
        self.ready: Any = None  # CUDA event after the copy back


def _dead() -> None:
    return None


class HostOffload:
    """Moves the inputs of compiled decoder layers to host memory between forward and backward (pinned and
    asynchronous on CUDA). Wraps each layer's compiled call once; active only inside `context()`."""

    def __init__(self, layers: list[torch.nn.Module], *, min_bytes: int = MIN_BYTES, device_copy: bool = True) -> None:
        self.min_bytes = min_bytes
        self.device_copy = device_copy
        self.active = False
        self._order: list[_Stash] = []  # this forward's stashed inputs, in layer order
        self._pending: list[_Stash] = []  # copy down issued, block not yet given back
        self.offloaded_bytes = 0  # in total, for tests and the bench
        self._down: Any = None
        self._up: Any = None
        # Host buffers, one per position in the layer order, reused across steps: (buffer, its current owner).
        self._slots: list[tuple[torch.Tensor, Callable[[], _Stash | None]]] = []
        self._last_read: dict[int, Any] = {}  # slot -> event after its latest copy back
        for layer in layers:
            compiled = getattr(layer, "_compiled_call_impl", None)
            if compiled is None:  # an eager layer's recomputation would call the wrapper a second time
                raise ValueError("speed.offload_activations needs compiled layers (speed.compile)")
            layer._compiled_call_impl = partial(self._call, compiled)

    # -- forward ---------------------------------------------------------------------------------------------
    def _call(self, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = compiled(*args, **kwargs)
        if self.active:
            x = args[0] if args else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.requires_grad and self._movable(x):
                self._stash(x, y)
        return out

    def _movable(self, x: torch.Tensor) -> bool:
        storage = x.untyped_storage()
        nbytes = x.numel() * x.element_size()
        return (x.is_floating_point() and x._base is None and not isinstance(x, torch.nn.Parameter)
                and x.is_contiguous() and x.storage_offset() == 0
                and storage.nbytes() == nbytes >= self.min_bytes and storage.resizable())

    def _stash(self, x: torch.Tensor, y: torch.Tensor) -> None:
        entry = _Stash(x.untyped_storage(), x.device, len(self._order), self._order)
        host = self._host_buffer(entry)
        data = x.detach().view(-1).view(torch.uint8)
        if self.device_copy and x.is_cuda:
            if self._down is None:
                self._down, self._up = torch.cuda.Stream(x.device), torch.cuda.Stream(x.device)
            self._down.wait_stream(torch.cuda.current_stream(x.device))  # x is complete
            with torch.cuda.stream(self._down):
                if entry.slot in self._last_read:  # the buffer's previous contents have been copied back
                    self._down.wait_event(self._last_read[entry.slot])
                host.copy_(data, non_blocking=True)
                entry.stored = torch.cuda.Event()
                entry.stored.record()
        else:
            host.copy_(data)
        del data
        entry.host = host
        self._free_pending()  # the layer before's input: its copy down was issued one layer ago
        if entry.stored is None:
            entry.storage.resize_(0)  # a plain copy has finished already
        else:
            self._pending.append(entry)
        self.offloaded_bytes += entry.nbytes
        self._order.append(entry)
        y.register_hook(partial(self._before_backward, entry))  # the hook keeps the entry as long as the graph

    def _free_pending(self) -> None:
        """Give back the blocks of the inputs whose copies down were issued: the compute stream first waits for
        each copy (issued one layer earlier, so it has normally finished), then the storage is emptied. Freeing
        one layer late, instead of `record_stream`, keeps this valid inside a CUDA-graph recording (speed.graphs),
        where the allocator cannot see the copy stream's use of the block."""
        for entry in self._pending:
            torch.cuda.current_stream(entry.device).wait_event(entry.stored)
            entry.storage.resize_(0)
        self._pending = []

    def _host_buffer(self, entry: _Stash) -> torch.Tensor:
        """Slot `entry.slot`'s host buffer; a new one if it is too small or still holds an input whose backward
        has not run (a graph kept without backpropagating it)."""
        slot, nbytes = entry.slot, entry.nbytes
        if slot == len(self._slots):
            self._slots.append((torch.empty(0, dtype=torch.uint8), _dead))
        buf, owner = self._slots[slot]
        previous = owner()
        if buf.numel() < nbytes or (previous is not None and previous.storage is not None):
            size = 1 << (nbytes - 1).bit_length()  # a power of two: few regrowths as packed lengths vary
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.device_copy and entry.device.type == "cuda")
            self._last_read.pop(slot, None)
        self._slots[slot] = (buf, weakref.ref(entry))
        return buf[:nbytes]

    # -- backward --------------------------------------------------------------------------------------------
    def _copy_back(self, entry: _Stash) -> None:
        """Give the storage its bytes again and start filling it from the host (idempotent)."""
        if entry.storage is None or entry.storage.nbytes() == entry.nbytes:
            return
        entry.storage.resize_(entry.nbytes)  # allocated on the compute stream, which is where it is freed
        # A separate tensor on the same storage: writing through it leaves the saved tensor's version unchanged.
        alias = torch.empty(0, dtype=torch.uint8, device=entry.device).set_(entry.storage)
        if entry.stored is None:
            alias.copy_(entry.host)
            return
        current = torch.cuda.current_stream(entry.device)
        self._up.wait_stream(current)  # the new block's earlier users are done with it
        with torch.cuda.stream(self._up):
            self._up.wait_event(entry.stored)
            alias.copy_(entry.host, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record()
        if not torch.cuda.is_current_stream_capturing():
            # If the autograd graph is dropped before this layer's backward, the block is freed while the copy may
            # still write it. (In a recording the replay always runs the whole backward.)
            alias.record_stream(self._up)
            self._last_read[entry.slot] = entry.ready

    def _before_backward(self, entry: _Stash, grad: torch.Tensor) -> None:
        """Hook on the layer output's gradient: the layer's backward runs next and needs its input."""
        if entry.storage is None:  # restored already (a second backward with retain_graph)
            return
        self._copy_back(entry)
        if entry.slot > 0:  # prefetch the input backward will ask for next: the layer below's
            self._copy_back(entry.order[entry.slot - 1])
        if entry.ready is not None:
            torch.cuda.current_stream(entry.device).wait_event(entry.ready)
        entry.storage = None

    @contextmanager
    def _activated(self) -> Iterator[None]:
        self._order, self._pending, self.active = [], [], True
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # Ordering between the copies of two recordings is the graph launches' own: events recorded
            # outside (or inside another recording) cannot be waited on inside one.
            self._last_read.clear()
        try:
            yield
        finally:
            self._free_pending()  # the last layer's input
            self.active = False

    def context(self) -> AbstractContextManager:
        """Offload for one forward pass (a new layer order each time)."""
        return self._activated()


def offload_context(offload: HostOffload | None, training: bool) -> AbstractContextManager:
    return offload.context() if offload is not None and training and torch.is_grad_enabled() else nullcontext()
