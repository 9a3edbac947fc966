"""CUDA graphs for the training micro-batch: forward, loss and backward replayed as one graph per packed length.

Why: with every decoder layer compiled, a Phi-2 QLoRA step is still CPU-bound. On an H100 the GPU works ~107 ms per
step while the CPU spends ~250 ms issuing it: ~4,500 Triton launches and ~1,700 matmul calls from Inductor's Python
wrappers, plus Dynamo's guard checks, per step (bench/NOTES.md entry 18). A CUDA graph replays all of it with one
call. torch.compile's own `mode="reduce-overhead"` (cudagraph trees, one graph per layer call) crashed or hung
with dynamic shapes on our layers (entries 7, 9, 17, 18), so the whole micro-batch is captured here, by hand, around
the compiled layers.

What one graph holds, per key (packed length, number of examples):
- the decoder forward under the plan's autocast, with the example boundaries read from a static device buffer;
- the output head + cross-entropy over every position, ignored ones weighted 0 (selecting the answer positions
  would give a data-dependent shape, which a graph cannot have; the head costs ~3% more on Phi-2 for it);
- the backward of (NLL sum x scale), which autograd adds in place into the trainable parameters' `.grad` buffers;
  these therefore stay the same tensors for the whole run (the loop zeroes them in place). The eager warm-up checks
  that autograd did add in place (same storage after it); otherwise the body switches to `torch.autograd.grad` +
  an explicit add, which holds every gradient at once until the end of backward (+0.18 GiB on Phi-2).
Before a replay the batch is copied into the static buffers, the scale (1 / answer tokens of the optimizer step)
into a device scalar, and the dropout seed is refreshed in place.

Lengths vary, so packed rows are padded to a multiple of `bucket` tokens (speed.pad_to_bucket: an ignored segment
of its own): a run sees a handful of keys. `prepare` records every bucket up to the longest row the data can make
before training starts (a warm-up run with loss weight 0, then the capture; ~0.5 s each for Phi-2); a key met later
(a row that needed no padding, say) runs eagerly once, the warm-up a capture needs, and is recorded then. The graphs
share one memory pool: what they keep between replays (the `.grad` buffers, the loss) lives outside it.

Used only for a packed row in training with gradients on; anything else (padded batches, evaluation) takes the
eager path. Activation offload (speed.offload) is recorded with the rest; FSDP is not (collectives). If a recording
fails (an operation that cannot be captured), training goes on with the same body run eagerly, and says so once.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from loratune.data.tokenize import IGNORE

MAX_RECORDINGS = 32  # packed lengths `prepare_for` records at most (it widens the bucket beyond that)


@dataclass
class _Graph:
    """Static inputs of one key, and its recording (None until captured)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    graph: Any = None
    host_buffers: list[torch.Tensor] = field(default_factory=list)  # offload's pinned buffers the recording uses


@dataclass
class StepGraphs:
    """Records and replays forward + loss + backward of packed micro-batches (see the module docstring)."""

    model: Any
    params: list[torch.Tensor]
    bucket: int
    autocast: Any  # () -> context manager: the plan's autocast
    dropout_seed: torch.Tensor | None = None
    offload: Any = None  # speed.offload's HostOffload, recorded with the rest
    ce_chunk_tokens: int = 1024
    record: bool = True  # False: run the same body eagerly every time (tests on the CPU, where there are no graphs)
    graphs: dict[tuple[int, int], _Graph] = field(default_factory=dict)
    captures: int = 0
    replays: int = 0
    in_place: bool = True  # autograd accumulates into `.grad` in place (else autograd.grad + an explicit add)
    failed: bool = False  # a recording raised: the body runs eagerly from then on
    _pool: Any = None
    _side: Any = None  # the warm-ups' stream
    _grad_ptrs: list[int] | None = None  # where the `.grad` buffers live
    _scale: torch.Tensor | None = None
    _total: torch.Tensor | None = None

    def usable(self, batch: dict[str, torch.Tensor]) -> bool:
        return (self.model.training and torch.is_grad_enabled() and "attention_mask" not in batch
                and "position_ids" in batch and batch["input_ids"].shape[0] == 1)

    def _check_grad_buffers(self) -> None:
        """The `.grad` tensors are created once; recordings add into exactly these, so new ones (a
        `zero_grad(set_to_none=True)`) make every recording stale, and they are dropped."""
        if self._grad_ptrs is not None and all(p.grad is not None and p.grad.data_ptr() == ptr
                                               for p, ptr in zip(self.params, self._grad_ptrs)):
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grad_ptrs = [p.grad.data_ptr() for p in self.params]
        self.graphs.clear()
        self._pool = None

    def prepare(self, max_tokens: int, examples_per_row: int) -> int:
        """Record every bucket length up to `max_tokens` (rows of `examples_per_row` examples plus the padding
        segment) before training; returns how many were recorded. Warm-ups run with loss weight 0."""
        before = self.captures
        rng = torch.random.get_rng_state()  # warm-ups draw dropout seeds: training (and a resume) sees no draw
        try:
            self._prepare(max_tokens, examples_per_row)
        finally:
            torch.random.set_rng_state(rng)
        return self.captures - before

    def _prepare(self, max_tokens: int, examples_per_row: int) -> None:
        from loratune.speed.attention import segments_from_positions

        for length in range(self.bucket, -(-max_tokens // self.bucket) * self.bucket + 1, self.bucket):
            if self.failed:  # a recording failed: the micro-batches run eagerly, nothing to prepare
                return
            if length <= examples_per_row + 1:
                continue
            sizes = [(length - 1) // examples_per_row] * examples_per_row
            sizes[-1] += length - 1 - sum(sizes)
            positions = torch.cat([torch.arange(n) for n in [*sizes, 1]])[None]
            key = (length, len(segments_from_positions(positions).offsets))
            if key not in self.graphs:
                dummy = {"input_ids": torch.zeros((1, length), dtype=torch.long), "position_ids": positions,
                         "labels": torch.full((1, length), IGNORE, dtype=torch.long)}
                self.run(dummy, 0.0)

    def prepare_for(self, lengths: list[int], batch_size: int) -> tuple[int, int]:
        """`prepare` for rows of `batch_size` examples with these lengths: (lengths recorded, longest row). Long
        rows widen the bucket so that at most MAX_RECORDINGS lengths are recorded (each costs a warm-up, a
        recording and some of the pool)."""
        k = min(batch_size, len(lengths))
        longest = sum(sorted(lengths, reverse=True)[:k])
        if longest > self.bucket * MAX_RECORDINGS and not self.graphs:
            self.bucket = -(-longest // (MAX_RECORDINGS * 64)) * 64
        return self.prepare(longest, k), longest

    def run(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward + backward of one packed micro-batch (CPU tensors) with loss weight `scale`; gradients are added
        into `.grad`. Returns the micro-batch's NLL sum over answer tokens (a device scalar, overwritten by the
        next call)."""
        from loratune.speed import pad_to_bucket
        from loratune.speed.attention import segments_from_positions
        from loratune.speed.dropout import next_seed

        batch = pad_to_bucket(batch, self.bucket)
        device = self.params[0].device
        seg = segments_from_positions(batch["position_ids"])  # on the CPU: no device sync
        key = (batch["input_ids"].shape[1], len(seg.offsets))
        if self._total is None:
            self._total = torch.zeros((), dtype=torch.float32, device=device)
            self._scale = torch.zeros((), dtype=torch.float32, device=device)
        self._check_grad_buffers()
        g = self.graphs.get(key)
        new = g is None
        values = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["labels"],
                  "cu_seqlens": seg.cu_seqlens}
        if new:
            g = _Graph(**{k: v.to(device) for k, v in values.items()})
        else:
            for k, v in values.items():
                getattr(g, k).copy_(v, non_blocking=True)
        self._scale.fill_(scale)
        if self.dropout_seed is not None:
            next_seed(self.dropout_seed)
        if not self.record:
            self.graphs[key] = g
            self._warm_up(g)
            return self._total
        if not new:
            g.graph.replay()
            self.replays += 1
            return self._total
        # Warm-up on a side stream (lazy initialisations stay out of the recording); this is the real computation
        # of this micro-batch. Recording then executes nothing.
        current = torch.cuda.current_stream(device)
        if self._side is None:  # one stream for every warm-up: cuBLAS keeps a workspace per stream it has seen
            self._side = torch.cuda.Stream(device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self._warm_up(g)
        current.wait_stream(self._side)
        g.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g.graph, pool=self._pool):
                self._body(g)
        except RuntimeError as err:  # this micro-batch is done (the warm-up); the later ones run the body eagerly
            self._stop_recording(err)
            return self._total
        self._pool = g.graph.pool()
        if self.offload is not None:
            g.host_buffers = [entry.host for entry in self.offload._order]
        self.graphs[key] = g
        self.captures += 1
        return self._total

    def _stop_recording(self, err: BaseException) -> None:
        """A recording failed (an operation that cannot be captured, from a model or library we do not control):
        keep training, with the same body run eagerly from here on, and say so once."""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"speed.cuda_graphs: recording failed ({reason}); the micro-batches run without CUDA graphs "
                      "from here on (set speed.cuda_graphs: false to skip the attempt)", RuntimeWarning, stacklevel=3)
        self.record, self.failed = False, True
        self.graphs.clear()
        self._pool = None

    def _warm_up(self, g: _Graph) -> None:
        """Run the body eagerly. If autograd replaced a `.grad` instead of adding in place (it adds in place into a
        defined `.grad` outside double backward, so this is a guard), the sums are in the new tensors: switch to
        the explicit add for good and take those as the buffers (which drops recordings made before)."""
        ptrs = [p.grad.data_ptr() for p in self.params]
        self._body(g)
        if self.in_place and any(p.grad.data_ptr() != ptr for p, ptr in zip(self.params, ptrs)):
            self.in_place = False
            self._check_grad_buffers()

    def _body(self, g: _Graph) -> None:
        from loratune.speed.cross_entropy import linear_cross_entropy_sum
        from loratune.training.loss import _inner_causal_lm

        lm = _inner_causal_lm(self.model)
        length = g.input_ids.shape[1]
        offloading = self.offload.context() if self.offload is not None else nullcontext()
        with self.autocast(), offloading:
            hidden = lm.model(input_ids=g.input_ids, position_ids=g.position_ids, use_cache=False,
                              cu_seq_lens_q=g.cu_seqlens, cu_seq_lens_k=g.cu_seqlens, max_length_q=length,
                              max_length_k=length).last_hidden_state
        targets = g.labels[0, 1:]
        keep = targets != IGNORE
        nll = linear_cross_entropy_sum(hidden[0, :-1], lm.get_output_embeddings(), targets.clamp_min(0),
                                       self.ce_chunk_tokens, weights=keep)
        if self.in_place:
            (nll * self._scale).backward()
        else:
            grads = torch.autograd.grad(nll * self._scale, self.params, allow_unused=True)
            used = [(p.grad, grad) for p, grad in zip(self.params, grads) if grad is not None]
            torch._foreach_add_([buf for buf, _ in used], [grad.to(buf.dtype) for buf, grad in used])
        self._total.copy_(nll.detach())
