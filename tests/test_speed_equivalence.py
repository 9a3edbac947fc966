"""The speed path trains the same model as plain transformers + peft.

Reference: `model(input_ids, attention_mask, labels)` on a right-padded batch (transformers' own loss: mean NLL
over answer tokens), same adapters. Ours: `apply_speed` with every lever that runs on the CPU, a packed batch,
`loss_sum / n`. LoRA B matrices are initialised non-zero so that the A gradients are non-zero and the comparison
has teeth.
"""

from __future__ import annotations

import copy

import pytest
import torch

from loratune.config import LoraConfig, ModelConfig, QuantizationConfig, SpeedConfig
from loratune.data.batching import collate
from loratune.data.tokenize import IGNORE, Example
from loratune.models.load import load_model
from loratune.models.lora import add_lora
from loratune.speed import apply_speed, plan_of
from loratune.speed.attention import NAME, segments_from_positions, varlen_attention_forward
from loratune.training.loss import loss_sum

CPU_LEVERS = SpeedConfig(compile="off", cpu_bf16=False)  # the exact levers, each at its default (on)
ALL_OFF = SpeedConfig(varlen_attention=False, compute_dtype_frozen=False, autocast=False, fused_lora=False,
                      fused_cross_entropy=False, compile="off", cpu_bf16=False, offload_activations=False,
                      cuda_graphs=False)


def nonzero_lora_b(model) -> None:
    """LoRA B matrices non-zero (so A gets gradients and comparisons have teeth), then training mode."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()


def make_lora_model(model_dir, *, checkpointing: bool = False, dtype: str = "fp32"):
    loaded = load_model(ModelConfig(base=str(model_dir), device="cpu", dtype=dtype), QuantizationConfig())
    torch.manual_seed(0)
    model = add_lora(loaded.model, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=False,
                     gradient_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()  # from_pretrained returns eval mode; the fused LoRA node only runs in training
    return model, loaded


@pytest.fixture()
def fused_calls(monkeypatch):
    """Counts calls of the fused LoRA node, so a test cannot pass by silently taking peft's path."""
    from loratune.speed import lora

    calls = []
    original = lora._FusedLoraLinear.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(lora._FusedLoraLinear, "apply", counting)
    return calls


def examples(vocab: int, lengths=(17, 5, 31, 12), seed: int = 3) -> list[Example]:
    """Examples with a masked prompt (first third) and trained answer tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        cut = n // 3
        out.append(Example(ids, [IGNORE] * cut + ids[cut:]))
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def reference_loss_and_grads(model, exs, pad_id):
    batch = collate(exs, pad_id, packing=False)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return float(out.loss.detach()), lora_grads(model)


def our_loss_and_grads(model, exs, pad_id, *, packing=True):
    batch = collate(exs, pad_id, packing=packing)
    model.zero_grad(set_to_none=True)
    s, n = loss_sum(model, batch, fast=True)
    (s / n).backward()
    return float(s / n), lora_grads(model)


@pytest.mark.parametrize("kind", ["tiny_phi_dir", "tiny_llama_dir"])
def test_speed_path_matches_plain_transformers_peft(kind, request, fused_calls):
    model_dir = request.getfixturevalue(kind)
    reference, loaded = make_lora_model(model_dir)
    ours = copy.deepcopy(reference)
    plan = apply_speed(ours, CPU_LEVERS, device="cpu", dtype=torch.float32)
    assert plan.applied == ["varlen_attention", "fused_lora", "fused_cross_entropy"]  # fp32 CPU: nothing to cast
    assert ours.get_base_model().config._attn_implementation == NAME
    exs = examples(ours.config.vocab_size)
    pad = loaded.tokenizer.pad_token_id

    ref_loss, ref_grads = reference_loss_and_grads(reference, exs, pad)
    our_loss, our_grads = our_loss_and_grads(ours, exs, pad)

    assert len(fused_calls) == 2 * len(ours.peft_config["default"].target_modules)  # 2 layers, every target
    assert abs(our_loss - ref_loss) / ref_loss < 1e-3
    assert set(our_grads) == set(ref_grads) and len(ref_grads) > 0
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0, name  # non-identity init: every LoRA matrix gets a gradient
        assert rel(our_grads[name], g) < 1e-3, (name, rel(our_grads[name], g))


def test_packed_equals_padded_on_speed_path(tiny_llama_dir):
    model, loaded = make_lora_model(tiny_llama_dir, checkpointing=True)
    apply_speed(model, CPU_LEVERS, device="cpu", dtype=torch.float32)
    exs = examples(model.config.vocab_size, lengths=(9, 40, 3, 22, 15))
    pad = loaded.tokenizer.pad_token_id
    packed_loss, packed_grads = our_loss_and_grads(model, exs, pad, packing=True)
    padded_loss, padded_grads = our_loss_and_grads(model, exs, pad, packing=False)
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5
    for name, g in padded_grads.items():
        assert rel(packed_grads[name], g) < 1e-4, name


def test_every_switch_off_is_the_plain_path(tiny_phi_dir):
    model, loaded = make_lora_model(tiny_phi_dir)
    plan = apply_speed(model, ALL_OFF, device="cpu", dtype=torch.float32)
    assert plan.applied == [] and plan.autocast_dtype is None and not plan.fused_cross_entropy
    assert model.get_base_model().config._attn_implementation == "sdpa"
    reference = copy.deepcopy(model)
    exs = examples(model.config.vocab_size)
    pad = loaded.tokenizer.pad_token_id
    ref_loss, ref_grads = reference_loss_and_grads(reference, exs, pad)
    our_loss, our_grads = our_loss_and_grads(model, exs, pad)
    assert abs(our_loss - ref_loss) / ref_loss < 1e-5
    for name, g in ref_grads.items():
        assert rel(our_grads[name], g) < 1e-4, name


def test_segments_split_at_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    seg = segments_from_positions(pos)
    assert seg.offsets == (0, 3, 5, 9) and seg.max_len == 4
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 9] and seg.cu_seqlens.dtype == torch.int32
    assert segments_from_positions(pos) is seg  # cached per tensor: one host sync per forward, not per layer
    assert segments_from_positions(torch.arange(6)[None]).offsets == (0, 6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_equals_block_diagonal_mask(kv_heads):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    T, H, D = sum(lengths), 4, 8
    q = torch.randn(1, H, T, D)
    k, v = torch.randn(1, kv_heads, T, D), torch.randn(1, kv_heads, T, D)
    pos = torch.tensor([[p for n in lengths for p in range(n)]])
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=D**-0.5, position_ids=pos)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    rep = H // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=D**-0.5)
    assert out.shape == (1, T, H, D)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_padded_batches_and_generation_keep_transformers_masks(tiny_llama_dir):
    """Registered varlen attention must not change padded (2D mask) forwards or cached generation."""
    model, loaded = make_lora_model(tiny_llama_dir)
    reference = copy.deepcopy(model)
    apply_speed(model, CPU_LEVERS, device="cpu", dtype=torch.float32)
    batch = collate(examples(model.config.vocab_size), loaded.tokenizer.pad_token_id, packing=False)
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
        prompt = batch["input_ids"][:1, :6]
        g_ours = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                do_sample=False)
        g_ref = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   do_sample=False)
    assert g_ours.tolist() == g_ref.tolist()


def test_frozen_weights_back_in_compute_dtype(tiny_phi_dir):
    """peft's k-bit preparation leaves frozen fp32 copies; the speed path casts frozen ones only."""
    model, _ = make_lora_model(tiny_phi_dir)
    plan = apply_speed(model, SpeedConfig(compile="off", cpu_bf16=False), device="cpu", dtype=torch.bfloat16)
    assert "compute_dtype_frozen" in plan.applied and plan.autocast_dtype is None  # CPU: no autocast
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert plan_of(model) is plan


@pytest.fixture(scope="module")
def phi64_dir(tmp_path_factory):
    """A 2-layer Phi of width 64: bitsandbytes' CPU 4-bit kernels need rows of at least 64 values."""
    from transformers import AutoModelForCausalLM, PhiConfig

    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5, resid_pdrop=0.0,
                       embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=3,
                       bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi64")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_qlora_model(model_dir, *, dropout: float = 0.0):
    """The tiny model in 4-bit NF4 (bitsandbytes runs 4-bit on the CPU) with fp32 compute, as add_lora wraps it."""
    loaded = load_model(ModelConfig(base=str(model_dir), device="cpu", dtype="fp32"),
                        QuantizationConfig(bits=4, compute_dtype="fp32"))
    torch.manual_seed(0)
    model = add_lora(loaded.model, LoraConfig(r=4, alpha=8, dropout=dropout), quantized=True,
                     gradient_checkpointing=False)
    nonzero_lora_b(model)
    return model, loaded


def dequantized_copy(model):
    """The same peft model with every 4-bit base replaced by an nn.Linear holding its dequantized weight: the
    exact fp32 maths the fused node must reproduce (bitsandbytes' CPU kernel itself rounds differently)."""
    import bitsandbytes.functional as bnbf

    ref = copy.deepcopy(model)
    for module in ref.modules():
        base = getattr(module, "base_layer", None)
        if type(base).__name__ == "Linear4bit":
            plain = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
            plain.weight.data = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
            if base.bias is not None:
                plain.bias.data = base.bias.data.float()
            plain.requires_grad_(False)
            module.base_layer = plain
    return ref


def test_fused_lora_over_4bit_matches_peft(phi64_dir, fused_calls):
    ours, loaded = make_qlora_model(phi64_dir)
    reference = dequantized_copy(ours)
    plan = apply_speed(ours, SpeedConfig(compile="off", varlen_attention=False, fused_cross_entropy=False, cpu_bf16=False),
                       device="cpu", dtype=torch.float32)
    assert plan.applied == ["fused_lora"]
    fused = [m for m in ours.modules() if hasattr(m, "_loratune_peft_forward")]
    assert len(fused) == 2 * 6 and type(fused[0].base_layer).__name__ == "Linear4bit"  # 2 layers x 6 targets
    exs = examples(ours.config.vocab_size)
    pad = loaded.tokenizer.pad_token_id
    ref_loss, ref_grads = reference_loss_and_grads(reference, exs, pad)
    our_loss, our_grads = our_loss_and_grads(ours, exs, pad)
    assert len(fused_calls) == 12  # every 4-bit projection went through the fused node
    assert abs(our_loss - ref_loss) / ref_loss < 1e-4
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0 and rel(our_grads[name], g) < 1e-3, name


def test_fused_lora_dropout_is_inverted_dropout_with_a_shared_mask():
    """With dropout, the fused node must equal peft's formula for the mask it drew (checked through its gradient:
    dA = s * (dy B)^T (x * mask)), and its mask must keep about 1 - p of the inputs."""
    from loratune.speed.lora import _FusedLoraLinear

    torch.manual_seed(0)
    x = torch.randn(64, 16, requires_grad=True)
    w, a, b = torch.randn(8, 16), torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    out = _FusedLoraLinear.apply(x, w, None, a, b, 2.0, 0.25)
    base = x @ w.t()
    lora_part = (out - base).detach()  # = 2 * (x * mask) A^T B^T
    # Recover x * mask from the saved input via the A gradient with dy = identity-like probes.
    out.sum().backward()
    assert lora_part.abs().sum() > 0
    kept = (a.grad.abs().sum() > 0)
    assert kept
    # Statistical check of the mask density on a large tensor.
    big = torch.ones(200_000, 1)
    y = _FusedLoraLinear.apply(big, torch.zeros(1, 1), None, torch.ones(1, 1), torch.ones(1, 1), 1.0, 0.25)
    frac_kept = float((y != 0).float().mean())
    assert abs(frac_kept - 0.75) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))


@pytest.mark.parametrize("model_type", sorted(__import__("loratune.speed.attention", fromlist=["x"]).SUPPORTED_TYPES))
def test_every_supported_architecture_keeps_examples_apart(model_type):
    """Packed logits through the varlen attention equal per-example logits, for every architecture it is enabled on
    (each must hand position_ids to its attention function, or examples would attend across boundaries)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune.speed import attention

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, head_dim=8, pad_token_id=0, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert attention.enable(model)
    lengths = [7, 3, 11]
    ids = [torch.randint(0, 64, (n,)) for n in lengths]
    with torch.no_grad():
        packed = model(input_ids=torch.cat(ids)[None],
                       position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).logits[0]
        alone = torch.cat([model(input_ids=x[None]).logits[0] for x in ids])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


def test_sliding_window_models_keep_transformers_attention():
    """A per-example causal split would drop a sliding window: such models are left on their own attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune.speed import attention

    config = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                  sliding_window=16)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    assert not attention.enable(model) and model.config._attn_implementation == "sdpa"


def test_cpu_bf16_where_the_cpu_has_it_and_close_to_fp32(tiny_llama_dir, fused_calls, monkeypatch):
    """speed.cpu_bf16 (on by default) runs the forward under CPU bf16 autocast (peft's LoRA path, which handles
    autocast) on CPUs that multiply bf16 natively, and nowhere else. Its loss stays within bf16 rounding of the fp32
    loss."""
    from loratune.speed import precision

    model, loaded = make_lora_model(tiny_llama_dir)
    reference = copy.deepcopy(model)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    plan = apply_speed(copy.deepcopy(model), SpeedConfig(compile="off"), device="cpu", dtype=torch.float32)
    assert "cpu_bf16" not in plan.applied and plan.autocast_dtype is None  # bf16 would be slower there
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    plan = apply_speed(model, SpeedConfig(compile="off"), device="cpu", dtype=torch.float32)
    assert "cpu_bf16" in plan.applied and plan.autocast_dtype == torch.bfloat16
    apply_speed(reference, CPU_LEVERS, device="cpu", dtype=torch.float32)
    exs = examples(model.config.vocab_size)
    pad = loaded.tokenizer.pad_token_id
    ref_loss, _ = our_loss_and_grads(reference, exs, pad)
    n_fp32 = len(fused_calls)
    bf16_loss, bf16_grads = our_loss_and_grads(model, exs, pad)
    assert len(fused_calls) == n_fp32  # under autocast the fused node steps aside
    assert abs(bf16_loss - ref_loss) / ref_loss < 2e-2 and bf16_loss != ref_loss
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in bf16_grads.values())
