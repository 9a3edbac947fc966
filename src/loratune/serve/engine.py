"""The request queue and the batching worker behind the HTTP server.

One worker thread owns the model. Requests wait in a bounded queue; the worker takes the oldest, waits a few
milliseconds for more to arrive (`max_wait_ms`), and runs up to `max_batch` requests whose sampling settings
match in one left-padded `generate` call. Streaming and non-streaming requests share batches: a stopping
criterion (`RowTracker`) sees every new token of every row, decodes each row incrementally, sends its text
delta to that request's asyncio queue, and ends a row on its own stop token, stop string, `max_tokens`, or a
client that went away, without ending the rest of the batch. Batching streaming requests matters most: 16
streaming clients share one forward pass per token instead of queueing behind each other.

Requests with a `seed` run alone (one batch, one random stream), so a seeded request is reproducible whatever
else is in flight. Different `max_tokens` in one batch are fine: the batch runs to the largest, each row stops
at its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from loratune.generate import InferenceModel, SamplingSettings, StopCutter


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests; the API answers 429."""


@dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on "done"
    completion_tokens: int = 0


@dataclass
class Job:
    prompt: str  # the fully rendered prompt text (template applied for chat)
    settings: SamplingSettings
    stops: list[str]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def send(self, event: Event) -> None:
        # Called from the worker thread: asyncio queues are not thread-safe, so hand over through the loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone (server shutting down)
            self.cancelled.set()

    def batch_key(self) -> tuple[Any, ...]:
        s = self.settings
        return (s.temperature, s.top_p, s.top_k, s.repetition_penalty, id(self) if s.seed is not None else None)


class _Row:
    def __init__(self, job: Job, stops: list[str]) -> None:
        self.job = job
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already passed to the cutter
        self.cutter = StopCutter(stops)
        self.done = False


class RowTracker(StoppingCriteria):
    """Per-row streaming and stopping inside one batched `generate` (see the module docstring)."""

    def __init__(self, jobs: list[Job], tokenizer: Any, stop_ids: list[int], base_stops: list[str],
                 lock: threading.Lock, stats: EngineStats) -> None:
        self.rows = [_Row(job, base_stops + job.stops) for job in jobs]
        self.stats = stats
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.lock = lock

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.done:
                continue
            if row.job.cancelled.is_set():  # the client went away: stop spending forward passes on its row
                row.done = True
                self.stats.cancelled += 1
                continue
            if token in self.stop_ids:
                self._finish(row, "stop")
                continue
            row.ids.append(token)
            with self.lock:
                text = self.tokenizer.decode(row.ids, skip_special_tokens=False)
            # A multi-byte character split over tokens decodes as trailing U+FFFD until its last byte arrives:
            # hold those back (they go out once followed by more text, or at the end).
            complete = len(text.rstrip("\ufffd"))
            if complete > row.emitted:
                delta = row.cutter.feed(text[row.emitted:complete])
                row.emitted = complete
                if delta:
                    row.job.send(Event("delta", delta))
                if row.cutter.stopped:
                    self._finish(row, "stop")
                    continue
            if len(row.ids) >= row.job.settings.max_new_tokens:
                self._finish(row, "length")
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _finish(self, row: _Row, reason: str) -> None:
        if not row.cutter.stopped and row.ids:  # text held back as an incomplete character goes out as it is
            with self.lock:
                text = self.tokenizer.decode(row.ids, skip_special_tokens=False)
            delta = row.cutter.feed(text[row.emitted:])
            row.emitted = len(text)
            if delta:
                row.job.send(Event("delta", delta))
        tail = row.cutter.flush()
        if tail:
            row.job.send(Event("delta", tail))
        row.done = True
        row.job.send(Event("done", finish_reason=reason, completion_tokens=len(row.ids)))

    def finish_all(self, reason: str = "length") -> None:
        """Rows still open when `generate` returned (it hit the batch's max_new_tokens)."""
        for row in self.rows:
            if not row.done and not row.job.cancelled.is_set():
                self._finish(row, reason)

    def fail_all(self, message: str) -> None:
        for row in self.rows:
            if not row.done:
                row.done = True
                row.job.send(Event("error", message))


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    batched_rows: int = 0
    rejected: int = 0
    cancelled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": self.batches, "rejected": self.rejected,
                "cancelled": self.cancelled,
                "mean_batch_size": round(self.batched_rows / self.batches, 2) if self.batches else 0.0}


class Engine:
    """The queue + the worker thread. `submit` is called from the event loop; everything else runs in the worker."""

    def __init__(self, im: InferenceModel, *, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64) -> None:
        self.im = im
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = EngineStats()
        self.tokenizer_lock = threading.Lock()  # the Rust tokenizer refuses concurrent use ("Already borrowed")
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        # OpenMP thread counts are per thread: a new worker thread would not inherit `torch.set_num_threads`.
        self._num_threads = torch.get_num_threads()
        self.stop_ids = im.template.stop_token_ids(im.tokenizer)
        self.base_stops = list(dict.fromkeys(
            s for s in [*im.template.stop_strings(im.tokenizer), im.tokenizer.eos_token, im.tokenizer.pad_token] if s))

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._work, name="loratune-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- called from the API ------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        with self.tokenizer_lock:
            return self.im.count_tokens(text)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, prompt: str, settings: SamplingSettings, *, stops: list[str] | None = None,
               prompt_tokens: int | None = None) -> Job:
        job = Job(prompt, settings, list(stops or []),
                  prompt_tokens if prompt_tokens is not None else self.count_tokens(prompt),
                  asyncio.get_running_loop())
        with self._cond:
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit is {self.max_queue})")
            self._pending.append(job)
            self.stats.requests += 1
            self._cond.notify()
        return job

    # -- the worker ---------------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        with self._cond:
            while self._running and not self._pending:
                self._cond.wait(timeout=0.5)
            if not self._running:
                return []
            # A short wait lets requests that arrive together share a batch; it costs at most max_wait of latency.
            deadline = time.monotonic() + self.max_wait
            while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
            gone = [job for job in self._pending if job.cancelled.is_set()]  # clients that left while waiting
            self.stats.cancelled += len(gone)
            live = [job for job in self._pending if not job.cancelled.is_set()]
            if not live:
                self._pending.clear()
                return []
            key = live[0].batch_key()
            batch = [job for job in live if job.batch_key() == key][: self.max_batch]
            taken = {id(job) for job in batch}
            self._pending = deque(job for job in live if id(job) not in taken)
            return batch

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(self._num_threads)
        while self._running:
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        im = self.im
        tokenizer = im.tokenizer
        settings = batch[0].settings.override(max_new_tokens=max(job.settings.max_new_tokens for job in batch))
        tracker = RowTracker(batch, tokenizer, self.stop_ids, self.base_stops, self.tokenizer_lock, self.stats)
        self.stats.batches += 1
        self.stats.batched_rows += len(batch)
        try:
            with self.tokenizer_lock:
                enc = tokenizer([job.prompt for job in batch], return_tensors="pt", padding=True,
                                padding_side="left", add_special_tokens=False).to(im.device)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            im.model.generate(**enc, **settings.generate_kwargs(), eos_token_id=self.stop_ids,
                              pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([tracker]))
            tracker.finish_all()
        except Exception as e:  # one bad batch must not kill the worker; its clients get an error each
            tracker.fail_all(f"generation failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
