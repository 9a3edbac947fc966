"""The comparison report: both models' rows, relative change, charts, changed examples; on a tiny model + adapter."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from loratune.evaluate.report import changed_examples, relative_change
from tests.conftest import QA_ROWS, tiny_run_config, write_jsonl


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_llama_dir):
    """A run folder as `loratune train` leaves it, with a non-identity LoRA adapter (no training needed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratune.config import dump_config
    from loratune.data.templates import resolve_template

    root = tmp_path_factory.mktemp("eval-run")
    data = write_jsonl(root / "qa.jsonl")
    cfg = tiny_run_config(tiny_llama_dir, data, root)
    cfg.data.split, cfg.data.validation_split = "train[:24]", "train[24:32]"
    run = root / "tiny-run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    (run / "template.json").write_text(json.dumps(resolve_template("chatml", tokenizer).to_dict()))
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(run / "adapter"))
    return run


@pytest.fixture(scope="module")
def report(adapter_run, tiny_llama_dir):
    from loratune.evaluate.runner import EvalOptions, run_eval

    out = adapter_run.parent / "report"
    summary = run_eval(EvalOptions(str(adapter_run), max_new_tokens=6, batch_size=4, semantic=False, output=out))
    return summary, out


def test_report_has_both_models_side_by_side(report, tiny_llama_dir):
    summary, out = report
    assert summary["examples"] == 8  # the run's validation split, train[24:32]
    assert list(summary["models"]) == ["tiny-run", tiny_llama_dir.name]
    saved = json.loads((out / "metrics.json").read_text())
    tuned, base = (saved["metrics"][k] for k in ("tiny-run", tiny_llama_dir.name))
    for metrics in (tuned, base):
        assert set(metrics) >= {"answer_perplexity", "answer_tokens", "exact_match", "token_f1", "rouge_l", "bleu",
                                "chrf"}
        assert metrics["answer_tokens"] == tuned["answer_tokens"] > 0  # same examples, same template
    assert tuned["answer_perplexity"] != pytest.approx(base["answer_perplexity"])  # the adapter changed the model
    change = saved["relative_change"]["answer_perplexity"]
    assert change == pytest.approx((tuned["answer_perplexity"] - base["answer_perplexity"]) / base["answer_perplexity"])
    md = (out / "report.md").read_text()
    header = f"| metric | {tiny_llama_dir.name} | tiny-run | change |"
    row = (f"| answer perplexity (lower is better) | {base['answer_perplexity']:.3f} | {tuned['answer_perplexity']:.3f} "
           f"| {100 * change:+.1f}% |")
    assert header in md and row in md
    assert "most improved examples" in md and "most regressed examples" in md


def test_report_files_are_complete_and_self_contained(report):
    summary, out = report
    assert {p.name for p in out.iterdir()} == {"metrics.json", "predictions.jsonl", "metrics.png", "perplexity.png",
                                               "report.md", "report.html"}
    for png in ("metrics.png", "perplexity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2 and "src='metrics.png'" not in page
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"tiny-run", *summary["models"]} <= set(r) for r in rows)
    assert rows[0]["references"] == [QA_ROWS[24]["answer"]]
    improved, regressed = summary["most_improved"], summary["most_regressed"]
    assert len(improved) <= 10 and len(regressed) <= 10 and not set(improved) & set(regressed)


def _result(primary: list[float], f1: list[float], nll: list[float]) -> SimpleNamespace:
    scores = [{"gsm8k_accuracy": p, "exact_match": 0.0, "token_f1": f, "rouge_l": f, "bleu": f, "chrf": f}
              for p, f in zip(primary, f1)]
    return SimpleNamespace(scores=scores, nll=SimpleNamespace(nll=nll, tokens=[1] * len(nll)))


def test_changed_examples_rank_by_primary_metric_then_text_metrics_then_perplexity():
    base = _result([0, 0, 100, 0, 0, 100], [10, 10, 50, 10, 10, 50], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    tuned = _result([100, 0, 0, 0, 100, 100], [10, 30, 50, 10, 60, 50], [2.0, 2.0, 2.0, 1.5, 2.0, 2.5])
    improved, regressed = changed_examples(tuned, base, "gsm8k_accuracy")
    # 4: right now and F1 +50; 0: right now, F1 unchanged; 1: F1 +20; 3: only perplexity fell (nll 2.0 -> 1.5)
    assert improved == [4, 0, 1, 3]
    # 2: became wrong; 5: only perplexity rose
    assert regressed == [2, 5]
    assert changed_examples(tuned, base, "gsm8k_accuracy", n=2)[0] == [4, 0]


def test_relative_change():
    assert relative_change(3.0, 4.0) == pytest.approx(-0.25)
    assert relative_change(5.0, 0.0) is None
    assert math.isclose(relative_change(-1.0, -2.0), 0.5)
