"""speed.chunked_mlp: a gated MLP in slices of its intermediate dimension gives the unsliced layer's loss and
gradients, dropout masks included (compiled on the CPU with `aot_eager`, as tests/test_compiled_layers.py does)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from loratune.data.batching import collate
from loratune.speed import chunked_mlp, dropout, plan_of
from loratune.speed.compile import compile_layers, decoder_layers
from loratune.training.loss import loss_sum
from tests.conftest import save_tiny_model
from tests.test_compiled_layers import _qlora, flash_on_cpu, one_thread  # noqa: F401  (fixtures)
from tests.test_speed_equivalence import examples, lora_grads, reference_loss_and_grads, rel

pytest.importorskip("bitsandbytes")


def _compiled(model, chunks: int, graphs: list):
    model = copy.deepcopy(model)
    layers = decoder_layers(model)
    plan_of(model).dropout_seed = dropout.install(layers, "cpu")
    assert chunked_mlp.install(layers, chunks) == (len(layers) if chunks > 1 else 0)
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compile_layers(model, backend=backend)
    return model


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    dropout.next_seed(plan_of(model).dropout_seed)
    s, n = loss_sum(model, batch, fast=True)
    (s / n).backward()
    return float(s / n), lora_grads(model)


def _linears(graphs: list) -> int:
    return sum(node.target is torch._C._nn.linear for gm in graphs[:1] for sub in gm.modules()
               if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes)


@pytest.mark.usefixtures("flash_on_cpu", "one_thread")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_sliced_mlp_same_loss_and_gradients(p, tmp_path):
    """Two slices of the intermediate dimension against the unsliced compiled layers: the same loss and LoRA
    gradients (rel < 1e-5), with dropout too (the slices draw the whole MLP's masks); without dropout also against
    plain transformers + peft (rel < 1e-3). The sliced maths is what was traced (more linear calls)."""
    model_dir = save_tiny_model(tmp_path, "llama", hidden=64)
    model, loaded = _qlora(model_dir, "llama", dropout=p)
    vocab, pad = model.config.vocab_size, loaded.tokenizer.pad_token_id
    lengths = (17, 5, 31, 12)
    batch = collate(examples(vocab, lengths=lengths), pad, packing=True)
    whole_graphs, sliced_graphs = [], []
    whole = _step(_compiled(model, 1, whole_graphs), batch)
    loss, grads = _step(_compiled(model, 2, sliced_graphs), batch)
    assert _linears(sliced_graphs) > _linears(whole_graphs)
    assert loss == pytest.approx(whole[0], rel=1e-5)
    for name, g in whole[1].items():
        assert g.abs().sum() > 0 and rel(grads[name], g) < 1e-5, (name, rel(grads[name], g))
    if p == 0:
        plain, _ = _qlora(model_dir, "llama", speed=False)
        peft_loss, peft_grads = reference_loss_and_grads(plain, examples(vocab, lengths=lengths), pad)
        assert loss == pytest.approx(peft_loss, rel=1e-3)
        for name, g in peft_grads.items():
            assert rel(grads[name], g) < 1e-3, (name, rel(grads[name], g))


def test_a_column_slice_draws_the_whole_tensors_mask():
    x = torch.ones(37, 96)
    seed, salt = torch.tensor(3), torch.tensor(5)
    whole = dropout.hashed_dropout(x, 200_000, seed, salt)
    parts = [dropout.hashed_dropout(x[:, i : i + 32], 200_000, seed, salt, col0=i) for i in (0, 32, 64)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert not torch.equal(parts[0], parts[1])  # (and the slices are not copies of one another)


def test_only_gated_mlps_with_fused_projections_are_sliced(tiny_phi_dir, tiny_llama_dir):
    phi, _ = _qlora(tiny_phi_dir, "phi")
    assert chunked_mlp.install(decoder_layers(phi), 2) == 0  # fc1/fc2: not a gated MLP
    llama, _ = _qlora(tiny_llama_dir, "llama")
    assert chunked_mlp.install(decoder_layers(llama), 1) == 0
    assert chunked_mlp.install(decoder_layers(llama), 3) == 0  # intermediate 64 is not a multiple of 3
    assert chunked_mlp.install(decoder_layers(llama), 4) == 2
