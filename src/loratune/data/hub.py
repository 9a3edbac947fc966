"""Hugging Face datasets (`data.source: hf`) -> conversations, routed by the rows' schema.

`data.path` is a hub name (`OpenAssistant/oasst1`, `THUDM/webglm-qa`) or anything `datasets.load_dataset` reads
locally: a folder of JSON/CSV/Parquet files, or one such file. The split's slice (`train[5000:10000]`,
`train[:10%]`) is applied by our own `apply_slice`, so a bound past the end is the same one-line error as for
local files instead of a datasets traceback.

The rows then go to the converter their columns call for: OASST1 message rows or trees, WebGLM records, or the
generic field map. Row origins read `name[split]:index` (0-based index into the split, before slicing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratune.config import DataConfig
from loratune.data.conversation import Conversation
from loratune.data.sources import EXTENSIONS, Row, Split, apply_slice, route_rows
from loratune.errors import LoratuneError

# Local single files: the datasets "packaged builder" that reads each extension.
_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def load_split(cfg: DataConfig, name: str, split: Split) -> Any:
    """The whole named split as a `datasets.Dataset` (no slice yet)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise LoratuneError("hub datasets need the datasets package", hint="pip install datasets") from None
    path = Path(name).expanduser()
    try:
        if path.is_file():
            kind = EXTENSIONS.get(path.suffix.lower())
            if kind is None:
                raise LoratuneError("datasets cannot read this file type", file=path, key="data.path",
                                    hint="use .jsonl, .json, .csv or .parquet")
            # A single local file is always the split "train" to datasets; any split name selects it.
            return datasets.load_dataset(_BUILDERS[kind], data_files=str(path), split="train")
        return datasets.load_dataset(name, split=split.name, revision=cfg.revision)
    except LoratuneError:
        raise
    except Exception as e:  # offline, unknown name, unknown split, bad file: all surface as various types
        raise _explain(name, split, e) from None


def _explain(name: str, split: Split, e: Exception) -> LoratuneError:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    lower = text.lower()
    if "unknown split" in lower or ("split" in lower and "should be one of" in lower):
        return LoratuneError(f'dataset {name} has no split "{split.name}": {text}', key="data.split",
                             hint="use one of the splits the dataset lists")
    if any(w in lower for w in ("offline", "connection", "couldn't reach", "resolve", "network", "max retries",
                                "doesn't exist on the hub", "not found", "cannot find")):
        return LoratuneError(f"cannot load dataset {name}: {text}", key="data.path",
                             hint="check the name; offline, download it first (or point data.path at local files)")
    return LoratuneError(f"cannot load dataset {name}: {text}", key="data.path")


def hub_rows(cfg: DataConfig, name: str, split: Split) -> list[Row]:
    dataset = load_split(cfg, name, split)
    indices = apply_slice(list(range(len(dataset))), split, what=f"{name}[{split.name}]")
    if not indices:
        return []
    # A contiguous slice: select a range (cheap, no index mapping); to_list materialises only those rows.
    subset = dataset.select(range(indices[0], indices[-1] + 1))
    return [(f"{name}[{split.name}]:{i}", record) for i, record in zip(indices, subset.to_list())]


def hub_conversations(cfg: DataConfig, name: str, split: Split,
                      dropped: dict[str, list[str]] | None = None) -> list[Conversation]:
    """Load a dataset split and convert its rows with the converter their schema calls for."""
    rows = hub_rows(cfg, name, split)
    return route_rows(cfg, rows, dropped)
