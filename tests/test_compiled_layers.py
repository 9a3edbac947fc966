"""Compiled decoder layers: one graph per layer kind, no graph breaks, the same loss and LoRA gradients.

Runs on the CPU with `torch.compile(backend="aot_eager")`: Dynamo traces and AOTAutograd derives the backward
exactly as on a GPU, without Inductor's slow CPU code generation. The flash varlen kernel is CUDA-only, so a
traceable CPU stand-in (masked SDPA built from the same cu_seqlens) takes its place; everything else (the NF4
dequantization in torch ops, the traced LoRA maths, the boundaries passed as keyword arguments) is the real path.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from loratune.config import LoraConfig, ModelConfig, QuantizationConfig, SpeedConfig
from loratune.data.batching import collate
from loratune.models.load import load_model
from loratune.models.lora import add_lora
from loratune.speed import apply_speed, attention, dropout, nf4, plan_of
from loratune.speed.compile import compile_layers, decoder_layers
from loratune.speed.lora import set_folded
from loratune.training.loss import loss_sum
from tests.conftest import save_tiny_model
from tests.test_speed_equivalence import examples, lora_grads, nonzero_lora_b, reference_loss_and_grads, rel

bnb = pytest.importorskip("bitsandbytes")


def cpu_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=True, enable_gqa=False):
    """[T, H, D] causal attention within each cu_seqlens segment (traceable: no host sync)."""
    idx = torch.arange(q.shape[0], device=q.device)
    seg = torch.searchsorted(cu_q[1:].long(), idx, right=True)
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


@pytest.fixture()
def flash_on_cpu(monkeypatch):
    monkeypatch.setattr(attention, "_VARLEN", cpu_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"is_causal"})
    monkeypatch.setattr(attention, "flash_varlen_usable", lambda query, dropout: dropout == 0.0)


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_dequantize_is_bitsandbytes(nested):
    """Torch-op dequantization equals bitsandbytes' kernel bit for bit, including a last partial absmax group."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight = bnb.nn.Params4bit(torch.randn(96, 200), requires_grad=False, compress_statistics=nested,
                               quant_type="nf4")._quantize("cpu")
    assert weight.quant_state.nested is nested and (96 * 200 // 64) % 256 != 0
    holder = torch.nn.Module()
    assert nf4.attach(holder, weight)
    assert holder._loratune_nf4_packed.data_ptr() == weight.data.data_ptr()  # a view, no copy
    assert not holder.state_dict()  # never saved with the model
    expected = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(nf4.dequantize(holder, dtype), expected.to(dtype))
    assert not nf4.attach(torch.nn.Module(), torch.nn.Parameter(torch.randn(4, 4)))


def test_nf4_dequantize_rows_shorter_than_a_block():
    """Rows of 32 values (tiny test models): the torch-op dequantization reconstructs the weight as well as for
    whole-block rows; bitsandbytes' CPU kernel does not (it assumes whole blocks per row), so compare with the
    original weight, not with that kernel."""
    torch.manual_seed(0)
    x = torch.randn(32, 32) * torch.linspace(0.1, 10, 32)[:, None]
    weight = bnb.nn.Params4bit(x.clone(), requires_grad=False, compress_statistics=True,
                               quant_type="nf4")._quantize("cpu")
    holder = torch.nn.Module()
    nf4.attach(holder, weight)
    ours = nf4.dequantize(holder, torch.float32)
    blocks = x.abs().reshape(-1, 64).amax(dim=1, keepdim=True)
    err = ((ours - x).reshape(-1, 64) / blocks).amax(dim=1)
    assert float(err.max()) < 0.15  # half the widest NF4 gap (1.0 - 0.723) plus the absmax quantization
    import bitsandbytes.functional as bnbf

    theirs = ((bnbf.dequantize_4bit(weight.data, weight.quant_state) - x).reshape(-1, 64) / blocks).amax(dim=1)
    assert float(theirs.max()) > 0.5  # the CPU kernel's wrong scales: if this fails, bitsandbytes fixed it


def _qlora(model_dir, kind, dropout=0.0, checkpointing=True, speed=True):
    loaded = load_model(ModelConfig(base=str(model_dir), device="cpu", dtype="fp32"),
                        QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="fp32"))
    torch.manual_seed(0)
    model = add_lora(loaded.model, LoraConfig(r=4, alpha=8, dropout=dropout), quantized=True,
                     gradient_checkpointing=checkpointing)
    nonzero_lora_b(model)
    if speed:
        apply_speed(model, SpeedConfig(compile="off", cpu_bf16=False), device="cpu", dtype=torch.float32)
    return model, loaded


@pytest.mark.parametrize("kind,fold", [("phi", True), ("llama", True), ("llama", False)])
def test_compiled_layers_one_graph_same_gradients(kind, fold, tmp_path, flash_on_cpu, one_thread):
    """`fold`: each LoRA B inside its base matmul (speed.lora's Folded, the default under compile), with the rank
    padded so rows of [x | h] stay 16-byte aligned (r=4 here)."""
    from torch._dynamo.utils import counters

    # Widths that are multiples of the 64-value quantization block: bitsandbytes' CPU dequantization kernel
    # assumes rows made of whole blocks (it reads the wrong scales otherwise), while the torch-op one is exact.
    model_dir = save_tiny_model(tmp_path, kind, hidden=64)
    eager, loaded = _qlora(model_dir, kind)
    plain, _ = _qlora(model_dir, kind, speed=False)  # plain transformers + peft over the same 4-bit base
    compiled = copy.deepcopy(eager)
    set_folded(compiled, fold)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(compiled, backend="aot_eager")
    assert all(not layer.gradient_checkpointing for layer in decoder_layers(compiled))  # recomputed inside
    pad = loaded.tokenizer.pad_token_id
    vocab = eager.config.vocab_size
    for lengths in ((17, 5, 31, 12), (9, 40, 3)):  # two packed lengths: one graph must serve both
        batch = collate(examples(vocab, lengths=lengths), pad, packing=True)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            s, n = loss_sum(model, batch, fast=True)
            (s / n).backward()
            results.append((float(s / n), lora_grads(model)))
        (ref_loss, ref_grads), (loss, grads) = results
        assert abs(loss - ref_loss) / ref_loss < 1e-5
        for name, g in ref_grads.items():
            assert g.abs().sum() > 0 and rel(grads[name], g) < 1e-4, (name, rel(grads[name], g))
        # ... and the check against plain transformers + peft (padded batch, its own loss): rel < 1e-3.
        peft_loss, peft_grads = reference_loss_and_grads(plain, examples(vocab, lengths=lengths), pad)
        assert abs(loss - peft_loss) / peft_loss < 1e-3
        assert set(peft_grads) == set(grads)
        for name, g in peft_grads.items():
            assert rel(grads[name], g) < 1e-3, (name, rel(grads[name], g))
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One frame compiled for all layers and both lengths (forward; the checkpointed recomputation reuses it).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_hashed_dropout_statistics_and_determinism():
    x = torch.ones(400, 500)
    seed, salt = torch.tensor(12345), torch.tensor(7)
    out = dropout.hashed_dropout(x, 100_000, seed, salt)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.003  # 200,000 draws: 3 sigma is 0.002
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))  # inverted dropout scale
    assert torch.equal(out, dropout.hashed_dropout(x, 100_000, seed, salt))  # a pure function: recomputation is exact
    for other in (dropout.hashed_dropout(x, 100_000, seed, torch.tensor(8)),
                  dropout.hashed_dropout(x, 100_000, torch.tensor(12346), salt)):
        agree = float(((other != 0) == kept).float().mean())
        assert abs(agree - (0.9**2 + 0.1**2)) < 0.005  # independent masks agree at p^2 + (1-p)^2
    rows = (out == 0).float().mean(dim=1)
    assert float(rows.std()) < 0.03  # no structure along the flattened index (binomial sd ~0.013)


def test_hashed_dropout_module_replaces_model_dropout(tiny_phi_dir):
    model, _ = _qlora(tiny_phi_dir, "phi", dropout=0.1)
    layers = decoder_layers(model)
    for layer in layers:
        layer.resid_dropout.p = 0.2
    seed = dropout.install(layers, "cpu")
    assert seed is not None and isinstance(layers[0].resid_dropout, dropout.HashedDropout)
    x = torch.ones(3, 50)
    layers[0].resid_dropout.train()
    assert (layers[0].resid_dropout(x) == 0).any()
    layers[0].resid_dropout.eval()
    assert torch.equal(layers[0].resid_dropout(x), x)
    salts = {int(getattr(m, dropout.SALT)) for m in model.modules() if hasattr(m, dropout.SALT)}
    sites = sum(1 for m in model.modules() if hasattr(m, dropout.SALT))
    assert len(salts) == sites == 2 * (len(model.peft_config["default"].target_modules) + 1)
    assert not any(dropout.SEED in k or dropout.SALT in k for k in model.state_dict())


def test_recomputed_dropout_equals_stored(tmp_path, flash_on_cpu, one_thread):
    """With dropout on, recomputation inside the compiled layer reproduces the forward's masks: the gradients
    equal those of the same compiled model without recomputation (same seeds), and differ from dropout off."""
    model_dir = save_tiny_model(tmp_path, "phi", hidden=64)
    runs = {}
    for name, ckpt, p, fold in (("recompute", True, 0.2, False), ("stored", False, 0.2, False),
                                ("no-dropout", True, 0.0, False), ("folded", True, 0.2, True)):
        model, loaded = _qlora(model_dir, "phi", dropout=p, checkpointing=ckpt)
        set_folded(model, fold)
        layers = decoder_layers(model)
        for layer in layers:
            layer.resid_dropout.p = p
        plan = plan_of(model)
        plan.dropout_seed = dropout.install(layers, "cpu")
        torch._dynamo.reset()
        compile_layers(model, backend="aot_eager")
        batch = collate(examples(model.config.vocab_size), loaded.tokenizer.pad_token_id, packing=True)
        tokens = batch["input_ids"].shape[1]
        saved = []  # bytes of activation-sized tensors autograd keeps for backward

        def pack(t, saved=saved, tokens=tokens):
            if tokens in t.shape:
                saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s, n = loss_sum(model, batch, fast=True)
        (s / n).backward()
        runs[name] = (float(s / n), lora_grads(model), sum(saved))
    assert runs["recompute"][0] == pytest.approx(runs["stored"][0], rel=1e-6)
    assert runs["recompute"][0] != pytest.approx(runs["no-dropout"][0], rel=1e-3)
    for name, g in runs["stored"][1].items():
        assert rel(runs["recompute"][1][name], g) < 1e-5, name
        assert rel(runs["folded"][1][name], g) < 1e-5, name  # B inside the base matmul: the same masks and maths
    # Recomputation keeps only each layer's inputs, with or without dropout (a symbolic dropout rate once made
    # the partitioner keep `x * scale` of every dropout site: 7.3 GiB instead of 3.4 on Phi-2), folded or not.
    assert runs["recompute"][2] == runs["no-dropout"][2] == runs["folded"][2] < runs["stored"][2]


def test_offloaded_layer_inputs_same_gradients(tmp_path, flash_on_cpu, one_thread):
    """speed.offload: after the forward every layer input's storage is empty (its bytes are on the host), nothing
    else was moved, each comes back before its layer's backward, and the loss and LoRA gradients are bit-equal
    (host copies stand in for the pinned CUDA copies on the CPU)."""
    from loratune.speed.offload import HostOffload

    model_dir = save_tiny_model(tmp_path, "llama", hidden=64)
    model, loaded = _qlora(model_dir, "llama")
    torch._dynamo.reset()
    compile_layers(model, backend="aot_eager")
    layers = decoder_layers(model)
    batch = collate(examples(model.config.vocab_size), loaded.tokenizer.pad_token_id, packing=True)
    tokens, hidden = batch["input_ids"].shape[1], model.config.hidden_size
    offload = HostOffload(layers, min_bytes=0, device_copy=False)
    results = {}
    for plan_offload in (None, offload, offload):  # twice: the second step reuses the host buffers
        plan_of(model).offload = plan_offload
        model.zero_grad(set_to_none=True)
        s, n = loss_sum(model, batch, fast=True)
        if plan_offload is not None:
            assert [e.storage.nbytes() for e in offload._order] == [0] * len(layers)  # away during the gap
            assert [e.host.numel() for e in offload._order] == [tokens * hidden * 4] * len(layers)
        (s / n).backward()
        results.setdefault(plan_offload is not None, []).append((float(s / n), lora_grads(model)))
    (loss, grads), = results[False]
    for off_loss, off_grads in results[True]:
        assert off_loss == loss
        for name, g in grads.items():
            assert torch.equal(off_grads[name], g), name
    assert all(e.storage is None for e in offload._order)  # every input was given back to autograd
    assert offload.offloaded_bytes == 2 * len(layers) * tokens * hidden * 4
    # Outside its context (evaluation, a plan without offload) the wrapper moves nothing.
    before = offload.offloaded_bytes
    with torch.no_grad():
        loss_sum(model, batch, fast=True)
    plan_of(model).offload = None
    loss_sum(model, batch, fast=True)
    assert offload.offloaded_bytes == before


def tiny_cuda_lora(tmp_path, backend: str = "inductor"):
    """A bf16 LoRA Llama (hidden 256) on CUDA with compiled layers and recomputation inside them."""
    model_dir = save_tiny_model(tmp_path, "llama", hidden=256)
    loaded = load_model(ModelConfig(base=str(model_dir), device="cuda", dtype="bf16"), QuantizationConfig())
    torch.manual_seed(0)
    model = add_lora(loaded.model, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=False,
                     gradient_checkpointing=True)
    nonzero_lora_b(model)
    apply_speed(model, SpeedConfig(compile="off"), device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compile_layers(model, backend=backend)
    return model, loaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and copy streams need CUDA")
def test_offload_on_cuda_frees_layer_inputs_same_gradients(tmp_path):
    """On CUDA the layer inputs leave the GPU between forward and backward (allocated memory after the forward drops
    by their size), come back through the copy streams, and the loss and LoRA gradients are bit-equal."""
    from loratune.speed.offload import HostOffload

    model, loaded = tiny_cuda_lora(tmp_path, backend="aot_eager")
    lengths = (300, 129, 411, 224)
    batch = {k: v.cuda() for k, v in collate(examples(model.config.vocab_size, lengths=lengths),
                                            loaded.tokenizer.pad_token_id, packing=True).items()}
    layer_inputs = len(decoder_layers(model)) * sum(lengths) * model.config.hidden_size * 2
    runs = {}
    for offload in (None, HostOffload(decoder_layers(model), min_bytes=0)):
        plan_of(model).offload = offload
        model.zero_grad(set_to_none=True)
        gc.collect()  # an earlier test's CUDA tensors freed inside the measured window would hide the difference
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        s, n = loss_sum(model, batch, fast=True)
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # lets the allocator take back blocks whose copies have finished
        after_forward = torch.cuda.memory_allocated() - before
        (s / n).backward()
        torch.cuda.synchronize()
        runs[offload is not None] = (float(s / n), lora_grads(model), after_forward)
    assert runs[True][0] == runs[False][0]
    for name, g in runs[False][1].items():
        assert torch.equal(runs[True][1][name], g), name
    assert runs[False][2] - runs[True][2] >= 0.9 * layer_inputs, (runs[False][2], runs[True][2], layer_inputs)
