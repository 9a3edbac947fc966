"""Answer-only perplexity equals exp(mean NLL) computed by hand: a log-softmax loop over each example's logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from loratune.data.conversation import Conversation, Message
from loratune.data.templates import resolve_template
from loratune.data.tokenize import IGNORE
from loratune.evaluate.perplexity import answer_nll, encode_for_eval

CONVERSATIONS = [
    Conversation([Message("user", "What is 2 plus 3?"), Message("assistant", "2 plus 3 is 5.")], "qa:1"),
    Conversation([Message("system", "Be brief."), Message("user", "Capital of France?"),
                  Message("assistant", "Paris.")], "qa:2"),
    Conversation([Message("user", "Name three colours, please, in one line."),
                  Message("assistant", "Red, green and blue are three colours.")], "qa:3"),
]


def manual_nll(model, examples):
    """Per example: sum over answer positions t of -log softmax(logits[t-1])[token t], one example at a time."""
    sums, counts = [], []
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            total, n = 0.0, 0
            for t in range(1, len(ex.input_ids)):
                if ex.labels[t] != IGNORE:
                    total -= float(log_probs[t - 1, ex.input_ids[t]])
                    n += 1
            sums.append(total)
            counts.append(n)
    return sums, counts


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    template = resolve_template("chatml", tiny_tokenizer)
    examples, _ = encode_for_eval(CONVERSATIONS, template, tiny_tokenizer, max_length=512)
    return model, examples


@pytest.mark.parametrize("fast", [True, False], ids=["answer-positions-head", "full-logits"])
def test_answer_perplexity_equals_exp_mean_nll_by_hand(tiny, tiny_tokenizer, fast):
    model, examples = tiny
    sums, counts = manual_nll(model, examples)
    # Batch of 2 with 3 examples of different lengths: padding and the length sort are exercised.
    result = answer_nll(model, examples, tiny_tokenizer.pad_token_id, batch_size=2, fast=fast)
    assert result.tokens == counts
    assert result.tokens[1] == len("Paris.") + 1  # one token per byte, plus the trained end-of-turn token
    assert result.nll == pytest.approx(sums, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(sums) / sum(counts)), rel=1e-5)
    assert result.example_perplexity(2) == pytest.approx(math.exp(sums[2] / counts[2]), rel=1e-5)


def test_answer_perplexity_through_a_lora_adapter(tiny, tiny_tokenizer):
    """The answer-positions path must run the adapter (it calls the inner decoder of the peft model)."""
    from peft import LoraConfig, get_peft_model

    model, examples = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))  # non-identity, so the adapter matters
    base = answer_nll(model, examples, tiny_tokenizer.pad_token_id, batch_size=3)
    tuned = answer_nll(peft_model, examples, tiny_tokenizer.pad_token_id, batch_size=3)
    sums, _ = manual_nll(peft_model, examples)
    assert tuned.nll == pytest.approx(sums, rel=1e-5)
    assert abs(tuned.perplexity - base.perplexity) > 1e-3


def test_long_examples_are_cut_in_place(tiny_tokenizer):
    template = resolve_template("chatml", tiny_tokenizer)
    full, _ = encode_for_eval(CONVERSATIONS, template, tiny_tokenizer, max_length=512)
    cut, truncated = encode_for_eval(CONVERSATIONS, template, tiny_tokenizer, max_length=40)
    assert truncated == sum(len(ex.input_ids) > 40 for ex in full) >= 1
    assert [ex.origin for ex in cut] == ["qa:1", "qa:2", "qa:3"]  # order kept: indices match the generations
    assert all(len(ex.input_ids) <= 40 for ex in cut)
