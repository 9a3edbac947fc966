"""speed.graphs: what a CUDA graph records (forward over a bucket-padded packed row, every position's head +
cross-entropy weighted by its label mask, autograd.grad added into `.grad`) gives the loss and LoRA gradients of
the eager path, through the training loop's `accumulate`. On the CPU the same body runs eagerly (`record=False`);
the recording itself is checked on CUDA."""

from __future__ import annotations

import pytest
import torch

from loratune.config import SpeedConfig
from loratune.data.batching import collate
from loratune.speed import apply_speed, plan_of
from loratune.speed.graphs import StepGraphs
from loratune.training.loop import accumulate
from loratune.training.loss import loss_sum
from tests.conftest import save_tiny_model
from tests.test_speed_equivalence import examples, lora_grads, make_lora_model, rel


def _graphs(model, bucket: int, record: bool) -> StepGraphs:
    plan = plan_of(model)
    return StepGraphs(model, [p for p in model.parameters() if p.requires_grad], bucket=bucket,
                      autocast=plan.autocast, dropout_seed=plan.dropout_seed, record=record)


@pytest.mark.parametrize("kind", ["llama", "phi"])
def test_graph_body_same_loss_and_gradients_through_the_loop(tmp_path, kind):
    model, loaded = make_lora_model(save_tiny_model(tmp_path, kind))
    apply_speed(model, SpeedConfig(compile="off", cpu_bf16=False), device="cpu", dtype=torch.float32)
    vocab, pad = model.config.vocab_size, loaded.tokenizer.pad_token_id
    batches = [collate(examples(vocab), pad, packing=True),
               collate(examples(vocab, lengths=(9, 40, 3), seed=4), pad, packing=True)]
    runs = {}
    for name in ("eager", "graphs"):
        plan_of(model).graphs = _graphs(model, bucket=16, record=False) if name == "graphs" else None
        model.zero_grad(set_to_none=True)
        loss, real = accumulate(model, batches, device="cpu", fast=True)
        runs[name] = (loss, real, lora_grads(model), plan_of(model).graphs)
    (loss, real, grads, _), (g_loss, g_real, g_grads, graphs) = runs["eager"], runs["graphs"]
    assert set(graphs.graphs) == {(80, 6), (64, 5)}  # (bucket-padded length, boundaries incl. the pad segment)
    assert g_loss == pytest.approx(loss, rel=1e-5) and g_real == real
    for name, g in grads.items():
        assert rel(g_grads[name], g) < 1e-5, name


def test_graph_gradient_buffers_kept_and_rebuilt(tmp_path):
    """The recorded adds target fixed `.grad` tensors: they accumulate across calls, and a `zero_grad` that sets
    them to None drops every recording and builds new buffers (never a write into a stale tensor)."""
    model, loaded = make_lora_model(save_tiny_model(tmp_path, "llama"))
    apply_speed(model, SpeedConfig(compile="off", cpu_bf16=False), device="cpu", dtype=torch.float32)
    batch = collate(examples(model.config.vocab_size), loaded.tokenizer.pad_token_id, packing=True)
    model.zero_grad(set_to_none=True)
    s, _ = loss_sum(model, batch)
    s.backward()
    once = lora_grads(model)
    graphs = _graphs(model, bucket=32, record=False)
    model.zero_grad(set_to_none=True)
    total = graphs.run(batch, 1.0)
    assert float(total) == pytest.approx(float(s), rel=1e-5)
    buffers = [p.grad for p in graphs.params]
    graphs.run(batch, 1.0)
    assert graphs.in_place and all(p.grad is b for p, b in zip(graphs.params, buffers))
    for name, g in lora_grads(model).items():
        assert rel(g, 2 * once[name]) < 1e-5, name
    model.zero_grad(set_to_none=True)
    graphs.graphs[(0, 0)] = None  # a stand-in recording that must be dropped with the old buffers
    graphs.run(batch, 1.0)
    assert (0, 0) not in graphs.graphs and all(p.grad is not b for p, b in zip(graphs.params, buffers))
    for name, g in lora_grads(model).items():
        assert rel(g, once[name]) < 1e-5, name


def test_prepare_covers_every_bucket_and_leaves_gradients_unchanged(tmp_path):
    """`prepare` runs each bucket length once with weight 0 (no gradient change); the rows training then meets
    (n examples + a padding segment) find their key already there."""
    model, loaded = make_lora_model(save_tiny_model(tmp_path, "llama"))
    apply_speed(model, SpeedConfig(compile="off", cpu_bf16=False), device="cpu", dtype=torch.float32)
    graphs = _graphs(model, bucket=16, record=False)
    model.zero_grad(set_to_none=True)
    graphs.prepare(max_tokens=70, examples_per_row=4)
    assert sorted(graphs.graphs) == [(16, 6), (32, 6), (48, 6), (64, 6), (80, 6)]
    assert all(float(p.grad.abs().max()) == 0.0 for p in graphs.params)
    batch = collate(examples(model.config.vocab_size), loaded.tokenizer.pad_token_id, packing=True)  # 65 tokens
    graphs.run(batch, 1.0)
    assert len(graphs.graphs) == 5
    # Rows far longer than 32 buckets widen the bucket instead of recording hundreds of lengths.
    wide = _graphs(model, bucket=16, record=False)
    wide.prepare_for([300] * 8, batch_size=4)  # rows up to 1,200 tokens: 75 buckets of 16
    assert wide.bucket == 64 and len(wide.graphs) == 19 <= 32


def test_a_failed_recording_falls_back_to_the_eager_body(tmp_path, monkeypatch):
    """If recording raises (an operation that cannot be captured), the micro-batch's warm-up result stands, one
    warning says what happened, and later micro-batches run the same body eagerly: training goes on unchanged.
    (torch.cuda's stream and graph calls are stand-ins here: the control flow is what is checked.)"""
    from contextlib import nullcontext

    model, loaded = make_lora_model(save_tiny_model(tmp_path, "llama"))
    apply_speed(model, SpeedConfig(compile="off", cpu_bf16=False), device="cpu", dtype=torch.float32)
    vocab, pad = model.config.vocab_size, loaded.tokenizer.pad_token_id
    batches = [collate(examples(vocab), pad, packing=True),
               collate(examples(vocab, lengths=(9, 40, 3), seed=4), pad, packing=True)]
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate(model, batches, device="cpu", fast=True)
    grads = lora_grads(model)

    class Stream:
        def wait_stream(self, other):
            pass

    def refuse(graph, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    graphs = plan_of(model).graphs = _graphs(model, bucket=16, record=True)
    model.zero_grad(set_to_none=True)
    with pytest.warns(RuntimeWarning, match=r"recording failed \(operation not permitted when stream is capturing\)"):
        g_loss, _ = accumulate(model, batches, device="cpu", fast=True)
    assert graphs.failed and graphs.captures == 0 and all(g.graph is None for g in graphs.graphs.values())
    assert graphs.prepare(max_tokens=200, examples_per_row=4) == 0  # no further attempt
    assert g_loss == pytest.approx(loss, rel=1e-5)
    for name, g in lora_grads(model).items():
        assert rel(g, grads[name]) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_recorded_step_replays_eager_gradients_on_cuda(tmp_path):
    """Record two packed lengths, replay each: the loss and LoRA gradients of every replay equal the eager path's
    (bf16), replaying one length after another disturbs neither, and recording the activation offload with the
    rest (copies on forked streams, storage resizes in the graph's pool) gives the very same bits."""
    from loratune.speed.compile import decoder_layers
    from loratune.speed.offload import HostOffload
    from tests.test_compiled_layers import tiny_cuda_lora

    model, loaded = tiny_cuda_lora(tmp_path)
    vocab, pad = model.config.vocab_size, loaded.tokenizer.pad_token_id
    batches = [collate(examples(vocab, lengths=(300, 129, 411, 224)), pad, packing=True),
               collate(examples(vocab, lengths=(90, 500), seed=4), pad, packing=True)]
    eager = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        s, _ = loss_sum(model, {k: v.cuda() for k, v in batch.items()})
        s.backward()
        eager.append((float(s), lora_grads(model)))
    # A live eager graph would keep its gradient accumulators, created on the default stream, and the recorded
    # backward would synchronise with that stream (illegal while recording). The training loop keeps none.
    del s
    offload = HostOffload(decoder_layers(model), min_bytes=0)
    replays = {}
    for name, off in (("plain", None), ("offload", offload)):
        graphs = _graphs(model, bucket=256, record=True)
        graphs.offload = off
        model.zero_grad(set_to_none=True)
        runs = []
        for i in (0, 1, 0, 1, 0):  # capture 0, capture 1, then replays
            model.zero_grad(set_to_none=False)
            total = float(graphs.run(batches[i], 1.0))
            torch.cuda.synchronize()
            grads = lora_grads(model)
            assert total == pytest.approx(eager[i][0], rel=1e-2)  # bf16, and a padded row: other matmul shapes
            for key, g in grads.items():
                assert rel(g, eager[i][1][key]) < 5e-2, key
            runs.append(grads)
        assert graphs.captures == 2 and graphs.replays == 3 and graphs.in_place
        for key, g in runs[2].items():  # two replays of the same micro-batch: the same kernels, the same bits
            assert torch.equal(runs[4][key], g), key
        replays[name] = runs
    assert offload.offloaded_bytes > 0 and all(len(g.host_buffers) == 2 for g in graphs.graphs.values())
    for i in (2, 3):
        for key, g in replays["plain"][i].items():
            assert torch.equal(replays["offload"][i][key], g), key
