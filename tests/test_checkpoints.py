"""Checkpoints: every `save_steps`, the last `save_total_limit` kept plus the best by validation loss; each one
complete (adapter + optimizer + scheduler + RNG + state) and found again by `--resume`; incomplete ones never."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loratune.errors import LoratuneError
from loratune.train import train
from loratune.training import checkpoint as ckpt
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("ckpt")
    data = write_jsonl(tmp / "qa.jsonl")
    # evaluated every step, saved every 2, the last 2 kept: the best may be any step, and must survive pruning
    cfg = tiny_run_config(tiny_llama_dir, data, tmp / "runs", max_steps=5, learning_rate=0.1, scheduler="constant",
                          eval_steps=1, save_steps=2, save_total_limit=2, report_to="none")
    cfg.data.split = "train[:24]"
    cfg.data.validation_split = "train[24:32]"
    return train(cfg, show_progress=False)


def test_keeps_last_n_plus_best(run):
    s = run.summary
    folder = run.run_dir / "checkpoints"
    kept = sorted(p.name for p in folder.iterdir())
    assert set(kept) == {"last", "step-000004", "step-000005", f"step-{s['best_step']:06d}"}
    rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert s["best_step"] == min((r for r in rows if "val_loss" in r), key=lambda r: r["val_loss"])["step"]


def test_prune_keeps_an_old_best(tmp_path):
    for step in range(1, 6):
        (tmp_path / f"step-{step:06d}" / "adapter").mkdir(parents=True)
        (tmp_path / f"step-{step:06d}" / "adapter" / "adapter_config.json").write_text("{}")
        (tmp_path / f"step-{step:06d}" / "training_state.pt").write_bytes(b"")
        (tmp_path / f"step-{step:06d}" / "state.json").write_text("{}")
    ckpt.prune(tmp_path, 2, protect=tmp_path / "step-000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004", "step-000005"]


def test_checkpoint_holds_everything_to_continue(run):
    folder = run.run_dir / "checkpoints" / "step-000005"
    assert ckpt.is_complete(folder)
    state = ckpt.load_state(folder)
    assert state.step == 5 and state.train_tokens > 0 and state.best_step == run.summary["best_step"]
    blob = torch.load(folder / "training_state.pt", weights_only=False)
    assert blob["scheduler"]["last_epoch"] == 5
    from safetensors.torch import load_file

    n_lora = len(load_file(str(folder / "adapter" / "adapter_model.safetensors")))
    assert n_lora > 0 and len(blob["optimizer"]["state"]) == n_lora  # AdamW moments for every LoRA matrix
    assert all(int(v["step"]) == 5 for v in blob["optimizer"]["state"].values())
    assert set(blob["rng"][0]) >= {"python", "numpy", "torch"}


def test_resume_lookup_takes_newest_complete_only(run, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(run.run_dir, copy)
    cdir = copy / "checkpoints"
    assert ckpt.find_resume_checkpoint(copy).name == "step-000005"
    # a newer folder without state.json (what an older non-atomic writer or a copy cut short would leave)
    shutil.copytree(cdir / "step-000005", cdir / "step-000007")
    (cdir / "step-000007" / "state.json").unlink()
    (cdir / ".tmp-step-000009-abc").mkdir()
    assert ckpt.find_resume_checkpoint(copy).name == "step-000005"
    assert ckpt.find_resume_checkpoint(cdir / "step-000004").name == "step-000004"
    assert [p.name for p in ckpt.clean_partial(cdir)] == [".tmp-step-000009-abc"]


def test_no_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(LoratuneError, match="no complete checkpoint to resume from"):
        ckpt.find_resume_checkpoint(tmp_path)


def test_rng_of_each_rank_and_wrong_world_size(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = tmp_path / "c"
    folder.mkdir()
    torch.manual_seed(1)
    r0 = ckpt.rng_state()
    torch.manual_seed(2)
    r1 = ckpt.rng_state()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [r0, r1]},
               folder / "training_state.pt")
    ckpt.load_training_state(folder, opt, sched, rank=1)
    torch.manual_seed(2)
    expected = torch.rand(3)
    ckpt.load_training_state(folder, opt, sched, rank=1)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(LoratuneError, match="resume with the same number of processes"):
        ckpt.load_training_state(folder, opt, sched, rank=2)


def test_a_later_best_replaces_the_old_best_when_pruning(tiny_llama_dir, qa_file, tmp_path, monkeypatch):
    """Best at step 3, then a save at 4, then a new best at 5: step 3 must go (it once stayed behind for good,
    because the save at 5 spared the *previous* best)."""
    from loratune.training import loop

    losses = iter([5.0, 4.0, 3.0, 3.5, 2.0])
    monkeypatch.setattr(loop, "evaluate_loss", lambda *a, **k: (next(losses), 10))
    cfg = tiny_run_config(tiny_llama_dir, qa_file, tmp_path, max_steps=5, eval_steps=1, save_steps=2,
                          save_total_limit=2, report_to="none")
    cfg.data.validation_split = "train[24:32]"
    result = train(cfg, show_progress=False)
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert kept == ["last", "step-000004", "step-000005"]
    assert result.summary["best_step"] == 5
