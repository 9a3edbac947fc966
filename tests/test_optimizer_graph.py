"""speed.optimizer_graph: the recorded update (clip + AdamW + zero_grad) trains exactly as the eager one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import get_scheduler

from loratune.speed.optimizer_graph import OptimizerStep, last_lr, recordable


def _params(device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g).to(device)) for shape in ((8, 4), (4,), (3, 5))]


def _train(update_kind: str, device: str = "cpu", steps: int = 7) -> tuple[list[torch.Tensor], list[float], Any]:
    """Seven steps of AdamW under a warm-up + linear schedule with clipping; gradients are large on purpose so that
    clipping acts. Returns the final parameters, the learning rates seen, and the update object."""
    params = _params(device)
    fused = device == "cuda" or None
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=steps)
    if update_kind == "eager":
        update = OptimizerStep(opt, params, 1.0)
    else:
        update = OptimizerStep(opt, params, 1.0, graphs=True, record=update_kind == "recorded")
    g = torch.Generator().manual_seed(1)
    lrs = []
    for step in range(steps):
        for p in params:
            grad = (torch.randn(p.shape, generator=g) * (step + 1)).to(device)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)  # what a backward does into a kept (zeroed) gradient
        update()
        sched.step()
        lrs.append(last_lr(sched))
    return [p.detach().cpu() for p in params], lrs, update


def test_graph_body_trains_as_the_eager_update_and_follows_the_schedule():
    """With the learning rate moved into a device tensor (what a recording needs) the parameters after seven steps
    equal the eager update's, the rate follows the schedule (warm-up, then decay), and gradients are zeroed in place
    (the same tensors, zero) instead of dropped."""
    eager, eager_lrs, _ = _train("eager")
    body, body_lrs, update = _train("body")
    assert body_lrs == pytest.approx(eager_lrs, rel=1e-6)
    assert body_lrs[0] < body_lrs[1] and body_lrs[-1] < body_lrs[2]  # the schedule moved it both ways
    for a, b in zip(eager, body):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    group = update.optimizer.param_groups[0]
    assert torch.is_tensor(group["lr"]) and group["lr"] is update._lrs[0]
    assert all(p.grad is not None and not p.grad.any() for p in update.params)


def test_a_float_written_over_the_tensor_rate_reaches_the_next_update():
    """A scheduler that assigns a float (older torch) instead of filling the tensor: the value is copied into the
    tensor the recording reads, and the group holds that tensor again."""
    params = _params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    update = OptimizerStep(opt, params, None, graphs=True, record=False)
    for p in params:
        p.grad = torch.ones_like(p)
    update()
    tensor = update._lrs[0]
    opt.param_groups[0]["lr"] = 0.5
    update()
    assert opt.param_groups[0]["lr"] is tensor and float(tensor) == 0.5


def test_only_device_side_adam_qualifies():
    """bitsandbytes-style or SGD optimizers keep host-side state a recording would freeze: they run eagerly."""
    params = _params()
    assert not recordable(torch.optim.SGD(params, lr=0.1))
    assert not recordable(torch.optim.AdamW(params, lr=0.1))  # CPU parameters
    update = OptimizerStep(torch.optim.SGD(params, lr=0.1), params, 1.0, graphs=True)
    assert not update.graphs and not update.keep_grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_recorded_update_matches_eager_on_cuda():
    """Fused AdamW recorded once and replayed six times: the same parameters as seven eager updates."""
    eager, eager_lrs, _ = _train("eager", "cuda")
    recorded, lrs, update = _train("recorded", "cuda")
    assert update.graph is not None and update.replays == 6
    assert not update.optimizer.param_groups[0]["capturable"]  # set for the recording only: checkpoints keep it off
    assert lrs == pytest.approx(eager_lrs, rel=1e-6)
    for a, b in zip(eager, recorded):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
