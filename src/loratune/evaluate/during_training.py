"""`training.eval_generate_every`: a cheap generation metric logged beside the validation loss.

At the evaluations (`training.eval_steps`) that fall on a multiple of N steps, and at the last step, the model
answers a fixed sample of validation prompts greedily with a few new tokens, and the mean token F1 of those
answers against the references is logged as `gen_token_f1` in metrics.jsonl. Validation loss can keep falling
while answers stop improving (or the model stops ending its turn); this shows it at the cost of one small batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loratune.data.conversation import Conversation
from loratune.data.templates import Template
from loratune.evaluate.metrics import best_over, token_f1

SAMPLE_SIZE = 8  # the first N validation conversations: fixed, so the numbers are comparable across steps
MAX_NEW_TOKENS = 48  # enough for the first sentence or two of an answer; token F1 rewards the overlap found


def generation_probe(model: Any, tokenizer: Any, template: Template, validation: Sequence[Conversation], *,
                     every: int, total_steps: int, device: str,
                     sample_size: int = SAMPLE_SIZE, max_new_tokens: int = MAX_NEW_TOKENS
                     ) -> Callable[[int], dict[str, float]]:
    """The `on_eval(step)` hook for `training.loop.fit`: {"gen_token_f1": ...} on due steps, {} otherwise."""
    from loratune.generate import InferenceModel, SamplingSettings, generate_batch

    sample = list(validation[:sample_size])
    references = [c.references or [c.answer] for c in sample]
    im = InferenceModel(model, tokenizer, template, name="training", device=device)
    settings = SamplingSettings(max_new_tokens=max_new_tokens)

    def on_eval(step: int) -> dict[str, float]:
        if not sample or (step % every and step != total_steps):
            return {}
        was_training = model.training
        model.eval()  # no dropout: greedy answers must depend on the weights alone
        try:
            answers = generate_batch(im, [c.prompt_messages for c in sample], settings, batch_size=len(sample))
        finally:
            if was_training:
                model.train()
        f1 = sum(best_over(token_f1, a, refs) for a, refs in zip(answers, references)) / len(sample)
        return {"gen_token_f1": round(f1, 3)}

    return on_eval
