"""Every bad input gets one clear line: the table of cases (issue 8).

Each CLI case writes its bad input under a fresh folder, runs `loratune` through `loratune.cli.main` (the entry
point that turns errors into one line; CliRunner would bypass it), and checks:
- the exit code is non-zero (2 for a user error, 1 for an OS error such as a full disk, 130 after SIGINT);
- stderr has exactly one `error:` line, it contains the expected fragment (which names the file/line, key or
  field), and no traceback is printed anywhere;
- nothing is half-written: no `.tmp-*`/`.old-*` leftovers anywhere under the folder (runs, cache, output), and no
  run folder exists unless the case is one where training had started (OOM, disk full).

Server cases drive the app factory in-process with Starlette's TestClient and check the HTTP status and OpenAI's
error body. `docs/errors.md` is generated from these tables (`python -m tests.test_bad_input > docs/errors.md`) and
a test asserts it is up to date, so the catalogue users read never drifts from what the code says.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import QA_ROWS, REPO, save_tiny_model, write_jsonl

DOCS = REPO / "docs" / "errors.md"


# --- the environment each case builds its bad input in ----------------------------------------------------------------
@dataclass
class Env:
    root: Path
    model: Path  # a tiny Llama folder (safetensors)
    other_model: Path  # a tiny Phi folder: a different base
    monkeypatch: pytest.MonkeyPatch

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def data(self, rows: list[dict] | None = None, name: str = "qa.jsonl") -> Path:
        return write_jsonl(self.root / name, QA_ROWS if rows is None else rows)

    def config(self, *, name: str = "c.yaml", **sections: dict) -> Path:
        """A small valid run config on the tiny model, with `sections` merged over it."""
        cfg = {
            "model": {"base": str(self.model), "device": "cpu", "gradient_checkpointing": False},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"path": str(self.data(name="train-data.jsonl")), "max_length": 128, "template": "chatml", "packing": False},
            "training": {"max_steps": 2, "batch_size": 4, "report_to": "none", "num_threads": 1},
            "output": {"dir": str(self.runs), "name": "t"},
        }
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        path = self.root / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # config | data | model | training | cli
    setup: Callable[[Env], list[str]]  # writes the bad input, returns the argv after `loratune`
    expected: str  # a fragment of the one error line: what is wrong and where
    cause: str  # for docs/errors.md
    fix: str
    exit_code: int = 2
    run_folder: bool = False  # training had started: a run folder (with only complete files) may exist
    names_where: bool = True  # False only where there is nothing to point at (no config given at all)


# --- setups ---------------------------------------------------------------------------------------------------------------
def _yaml_syntax(env: Env) -> list[str]:
    return ["train", str(env.text("c.yaml", "model:\n  base: x\n   device: cpu\n"))]


def _unknown_key(env: Env) -> list[str]:
    return ["train", str(env.config(training={"learnig_rate": 1e-4}))]


def _wrong_type(env: Env) -> list[str]:
    return ["train", str(env.config(training={"batch_size": "four"}))]


def _negative_lr(env: Env) -> list[str]:
    return ["train", str(env.config(training={"learning_rate": -1e-4}))]


def _unknown_choice(env: Env) -> list[str]:
    return ["train", str(env.config(training={"scheduler": "cosinus"}))]


def _patience_without_eval(env: Env) -> list[str]:
    return ["train", str(env.config(training={"patience": 2}))]


def _config_missing(env: Env) -> list[str]:
    return ["train", str(env.root / "nope.yaml")]


def _config_not_mapping(env: Env) -> list[str]:
    return ["train", str(env.text("c.yaml", "- model\n- data\n"))]


def _qlora_json_invalid(env: Env) -> list[str]:
    return ["train", "--config", str(env.config()), "--qlora_config", str(env.text("q.json", '{"r": 8,\n "alpha": }'))]


def _set_without_equals(env: Env) -> list[str]:
    return ["train", str(env.config()), "--set", "training.learning_rate"]


def _set_unknown_key(env: Env) -> list[str]:
    return ["train", str(env.config()), "--set", "training.bach_size=8"]


def _no_config(env: Env) -> list[str]:
    return ["train"]


def _max_length_over_context(env: Env) -> list[str]:
    return ["train", str(env.config(data={"max_length": 4096}))]


def _unknown_template(env: Env) -> list[str]:
    return ["train", str(env.config(data={"template": "chatml2"}))]


def _unknown_source(env: Env) -> list[str]:
    return ["train", str(env.config(data={"source": "xml"}))]


def _unknown_format(env: Env) -> list[str]:
    return ["train", str(env.config(data={"path": str(env.text("qa.txt", "hello"))}))]


def _no_data_path(env: Env) -> list[str]:
    cfg = env.config()
    raw = yaml.safe_load(cfg.read_text())
    del raw["data"]["path"]
    cfg.write_text(yaml.safe_dump(raw))
    return ["train", str(cfg)]


def _data_missing(env: Env) -> list[str]:
    return ["train", str(env.config(data={"path": str(env.root / "missing.jsonl")}))]


def _jsonl_not_json(env: Env) -> list[str]:
    path = env.text("qa.jsonl", '{"question": "a?", "answer": "b"}\n{"question": "c?", "answer": "d"}\n{question: 1}\n')
    return ["train", str(env.config(data={"path": str(path)}))]


def _jsonl_not_object(env: Env) -> list[str]:
    path = env.text("qa.jsonl", '{"question": "a?", "answer": "b"}\n[1, 2]\n')
    return ["train", str(env.config(data={"path": str(path)}))]


def _missing_answer(env: Env) -> list[str]:
    path = env.data([{"question": "a?", "answer": "b"}, {"question": "c?"}])
    return ["train", str(env.config(data={"path": str(path)}))]


def _unknown_fields(env: Env) -> list[str]:
    path = env.data([{"foo": "a?", "bar": "b"}])
    return ["train", str(env.config(data={"path": str(path)}))]


def _non_utf8(env: Env) -> list[str]:
    path = env.text("qa.jsonl", b'{"question": "a?", "answer": "b"}\n{"question": "caf\xe9?", "answer": "d"}\n')
    return ["train", str(env.config(data={"path": str(path)}))]


def _huge_record(env: Env) -> list[str]:
    record = json.dumps({"question": "long?", "answer": "x" * (10 * 2**20)})
    path = env.text("qa.jsonl", '{"question": "a?", "answer": "b"}\n' + record + "\n")
    return ["train", str(env.config(data={"path": str(path)}))]


def _oasst1_rows(cycle: bool) -> list[dict]:
    def msg(mid: str, parent: str | None, role: str, text: str) -> dict:
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "lang": "en", "rank": 0,
                "deleted": False, "synthetic": False}

    rows = [msg("r1", None, "prompter", "Hi?"), msg("a1", "r1", "assistant", "Hello.")]
    if cycle:  # p -> q -> p: neither ever reaches a root
        rows += [msg("p", "q", "prompter", "loop?"), msg("q", "p", "assistant", "loop.")]
    return rows


def _oasst1_cycle(env: Env) -> list[str]:
    path = env.data(_oasst1_rows(cycle=True), name="oasst1.jsonl")
    return ["train", str(env.config(data={"path": str(path), "source": "oasst1"}))]


def _empty_after_filter(env: Env) -> list[str]:
    path = env.data(_oasst1_rows(cycle=False), name="oasst1.jsonl")
    return ["train", str(env.config(data={"path": str(path), "source": "oasst1", "oasst1": {"lang": ["de"]}}))]


def _slice_beyond_end(env: Env) -> list[str]:
    return ["train", str(env.config(data={"split": "train[:1000]"}))]


def _bad_split(env: Env) -> list[str]:
    return ["train", str(env.config(data={"split": "train[a:b]"}))]


def _model_not_found(env: Env) -> list[str]:
    return ["train", str(env.config(model={"base": str(env.root / "no-such-model")}))]


def _model_no_weights(env: Env) -> list[str]:
    folder = env.root / "model"
    folder.mkdir()
    (folder / "config.json").write_text((env.model / "config.json").read_text())
    return ["train", str(env.config(model={"base": str(folder)}))]


def _corrupt_safetensors(env: Env) -> list[str]:
    folder = env.root / "model"
    folder.mkdir()
    for item in env.model.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    whole = (env.model / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(whole[: len(whole) // 3])  # a download cut short
    return ["train", str(env.config(model={"base": str(folder)}))]


def pickle_only_model(env: Env) -> Path:
    """The tiny model re-saved as pytorch_model.bin only (what old hub repos ship)."""
    from transformers import AutoModelForCausalLM

    folder = env.root / "pickle-model"
    folder.mkdir()
    # transformers 5 always writes safetensors from save_pretrained: write the pickle file ourselves.
    model = AutoModelForCausalLM.from_pretrained(env.model)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for item in env.model.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            (folder / item.name).write_bytes(item.read_bytes())
    return folder


def _pickle_only(env: Env) -> list[str]:
    return ["train", str(env.config(model={"base": str(pickle_only_model(env))}))]


def remote_code_model(env: Env, marker: Path) -> Path:
    """A model folder whose config.json maps the architecture to a local modelling file (`auto_map`). Importing that
    file writes `marker`: the proof that the code ran."""
    folder = env.root / "remote-model"
    folder.mkdir()
    for item in env.model.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('executed')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return folder


def _remote_code(env: Env) -> list[str]:
    return ["train", str(env.config(model={"base": str(remote_code_model(env, env.root / "marker"))}))]


def unsupported_gguf(env: Env) -> Path:
    import gguf

    path = env.root / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_unsupported(env: Env) -> list[str]:
    return ["train", str(env.config(model={"base": str(unsupported_gguf(env))}))]


def _cuda_without_gpu(env: Env) -> list[str]:
    return ["train", str(env.config(model={"device": "cuda"}))]


def wrong_base_adapter(env: Env) -> Path:
    """A LoRA adapter trained on the tiny Llama whose config names the tiny Phi (a different base) as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(env.model),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    folder = env.root / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(env.other_model)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _adapter_mismatch(env: Env) -> list[str]:
    return ["generate", str(wrong_base_adapter(env)), "Hello", "--device", "cpu", "--max-new-tokens", "2"]


def _resume_no_checkpoint(env: Env) -> list[str]:
    (env.runs / "t").mkdir(parents=True)
    return ["train", "--resume", str(env.runs / "t")]


def _eval_not_a_run(env: Env) -> list[str]:
    folder = env.root / "just-a-folder"
    folder.mkdir()
    return ["eval", str(folder), "--data", str(env.data()), "--no-compare", "--device", "cpu"]


def _merge_not_a_run(env: Env) -> list[str]:
    folder = env.root / "just-a-folder"
    folder.mkdir()
    return ["merge", str(folder), "--out", str(env.root / "merged")]


def _generate_prompts_missing(env: Env) -> list[str]:
    return ["generate", str(env.model), "--input", str(env.root / "prompts.jsonl"), "--output",
            str(env.root / "answers.jsonl"), "--device", "cpu"]


def _generate_no_prompt(env: Env) -> list[str]:
    return ["generate", str(env.model)]


def _inspect_bad_bits(env: Env) -> list[str]:
    return ["inspect", str(env.model), "--bits", "3"]


def _push_bad_repo_id(env: Env) -> list[str]:
    run = env.runs / "t"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(env.config().read_text())
    (run / "template.json").write_text("{}")
    return ["push", str(run), "--repo-id", "not a repo", "--dry-run"]


def _oom(env: Env) -> list[str]:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    env.monkeypatch.setattr("loratune.training.loop.loss_sum", out_of_memory)
    return ["train", str(env.config())]


def _disk_full(env: Env) -> list[str]:
    def no_space(obj, f, *args, **kwargs):  # the checkpoint's optimizer state hits a full disk
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    env.monkeypatch.setattr("loratune.training.checkpoint.torch.save", no_space)
    return ["train", str(env.config(training={"save_steps": 1}))]


CASES: list[Case] = [
    # config
    Case("yaml-syntax", "config", _yaml_syntax, "c.yaml:3:10: YAML syntax error",
         "the YAML does not parse (here: a key indented deeper than its siblings)",
         "fix the indentation or quoting at the line:column shown"),
    Case("unknown-key", "config", _unknown_key,
         'training.learnig_rate: unknown key in training; did you mean "learning_rate"?',
         "a misspelt or unsupported key", "rename the key as suggested; every key is documented in config.py"),
    Case("wrong-type", "config", _wrong_type, "training.batch_size: expected int, got str 'four'",
         "a value of the wrong type", "write a value of the type named"),
    Case("negative-learning-rate", "config", _negative_lr,
         "training.learning_rate: got -0.0001, input should be greater than 0",
         "a number outside its allowed range", "use a positive learning rate, e.g. 2e-4"),
    Case("unknown-choice", "config", _unknown_choice, "training.scheduler: got 'cosinus', expected 'cosine'",
         "a value that is not one of the allowed choices", "use one of the values listed"),
    Case("inconsistent-keys", "config", _patience_without_eval,
         "c.yaml:19: training.patience: needs training.eval_steps",
         "two settings that only make sense together", "set training.eval_steps, or remove training.patience"),
    Case("config-not-found", "config", _config_missing, "nope.yaml: config file not found",
         "the config path does not exist", "check the path"),
    Case("config-not-mapping", "config", _config_not_mapping, "c.yaml:1: the top level must be a mapping of sections",
         "the YAML is a list or a scalar, not sections", "write model:, data:, training: ... sections"),
    Case("qlora-json-syntax", "config", _qlora_json_invalid, "q.json:2:11: invalid JSON",
         "the --qlora_config JSON does not parse", "fix the JSON at the line:column shown"),
    Case("set-without-equals", "config", _set_without_equals, '--set "training.learning_rate" is not KEY=VALUE',
         "a --set override without a value", "write --set training.learning_rate=1e-4"),
    Case("set-unknown-key", "config", _set_unknown_key,
         '--set: training.bach_size: unknown key in training; did you mean "batch_size"?',
         "a --set override of a key that does not exist", "rename the key as suggested"),
    Case("no-config", "config", _no_config, "no config given", "`loratune train` without a config",
         "pass a config file: loratune train config.yaml (see examples/)", names_where=False),
    Case("max-length-over-context", "config", _max_length_over_context,
         "data.max_length: 4096 is longer than the model's context (512 tokens)",
         "data.max_length is larger than the base model's context window",
         "set data.max_length to at most the context shown, or auto"),
    Case("unknown-template", "config", _unknown_template, 'data.template: unknown template "chatml2"',
         "a template name that does not exist", "use one of the listed templates (or auto)"),
    Case("unknown-data-source", "config", _unknown_source, "data.source: got 'xml', expected 'auto'",
         "a data.source loratune has no loader for", "use auto, jsonl, json, csv, parquet, oasst1, webglm or hf"),
    # data
    Case("unknown-data-format", "data", _unknown_format, 'data.source: cannot tell the format of',
         "a data file whose extension names no known format", "set data.source, or rename the file (.jsonl ...)"),
    Case("no-data-path", "data", _no_data_path, "data.path: no training data given",
         "the config has no data.path", "set data.path to a file, folder or hub dataset name"),
    Case("data-file-not-found", "data", _data_missing, "missing.jsonl: data.path: data file not found",
         "data.path does not exist", "check the path"),
    Case("jsonl-not-json", "data", _jsonl_not_json, "qa.jsonl:3: not valid JSON",
         "a JSONL line that is not JSON", "fix or delete the line shown; each line must be one JSON object"),
    Case("jsonl-not-object", "data", _jsonl_not_object, "qa.jsonl:2: expected a JSON object, got list",
         "a JSONL line that is JSON but not an object", "make each line one {...} record"),
    Case("missing-answer", "data", _missing_answer, 'qa.jsonl:2: answer: record has no "answer"',
         "a record without its answer field", "fill the field, drop the record, or fix data.fields"),
    Case("unknown-fields", "data", _unknown_fields, "qa.jsonl:1: cannot tell which fields hold the prompt and answer",
         "records whose fields match no known layout", "set data.fields, e.g. {input: question, output: answer}"),
    Case("non-utf8", "data", _non_utf8, "qa.jsonl:2: not UTF-8", "bytes that are not UTF-8 (e.g. a Latin-1 export)",
         "re-save the file as UTF-8"),
    Case("huge-record", "data", _huge_record, "qa.jsonl:2: record is 10.0 MB, larger than the 4 MB limit",
         "one record of many megabytes (usually a broken export)", "split it into several records or drop it"),
    Case("oasst1-cycle", "data", _oasst1_cycle, "oasst1.jsonl:3: parent_id: message p is its own ancestor",
         "OASST1 parent_id links that form a loop", "fix the parent_id of one message in the loop"),
    Case("empty-after-filtering", "data", _empty_after_filter,
         "data.path: the training set is empty after loading and filtering",
         "every record was filtered out (language, split, slice, max_examples)",
         "check data.split, the slice and the filters (e.g. data.oasst1.lang)"),
    Case("slice-beyond-end", "data", _slice_beyond_end, "data.split: slice [:1000] is beyond the end of",
         "a split slice past the number of records", "use a bound within the record count shown"),
    Case("bad-split-syntax", "data", _bad_split, 'data.split: bad split "train[a:b]"',
         "a split that is not NAME or NAME[start:stop]", "write e.g. train[:1000] or train[:10%]"),
    # model
    Case("model-not-found", "model", _model_not_found, "no-such-model: model.base: model path not found",
         "model.base is a path that does not exist", "check the path, or use a hub id like microsoft/phi-2"),
    Case("model-without-weights", "model", _model_no_weights, "model: model folder has no weights (*.safetensors)",
         "a model folder with config.json but no weight files", "save the model with save_pretrained"),
    Case("corrupt-safetensors", "model", _corrupt_safetensors, "model: cannot read the weights of",
         "a truncated or corrupt .safetensors file", "re-download or re-save the model"),
    Case("pickle-weights-refused", "model", _pickle_only,
         "pickle-model: model folder has only pickle weights (.bin/.pt), which can run code when loaded",
         "the folder has only pickle weights, which can execute code when loaded",
         "convert to safetensors, or pass --allow-pickle if you trust the source"),
    Case("trust-remote-code-off", "model", _remote_code,
         "needs its own modelling code (set model.trust_remote_code: true only if you trust that repository)",
         "the model needs its own modelling code and trust_remote_code is off",
         "set model.trust_remote_code: true only if you trust that repository"),
    Case("gguf-unsupported-architecture", "model", _gguf_unsupported,
         "model.gguf: unsupported GGUF architecture", "a GGUF file of an architecture transformers cannot load",
         "use a GGUF of a supported architecture (listed), or the original safetensors model"),
    Case("cuda-without-gpu", "model", _cuda_without_gpu, "model.device: CUDA was requested but no GPU is visible",
         "model.device: cuda on a machine without a visible GPU", "set model.device: cpu (or auto); check nvidia-smi"),
    Case("adapter-different-base", "model", _adapter_mismatch, "adapter: adapter was trained on a different base model",
         "an adapter loaded onto another base model (detected before peft loads it)",
         "load the base the adapter was trained on (named in the hint)"),
    # training
    Case("out-of-memory", "training", _oom,
         "training.batch_size: out of memory at step 1 (lower training.batch_size",
         "the device ran out of memory during a step",
         "lower training.batch_size (raise grad_accum), shorten data.max_length, or quantization.bits: 4",
         run_folder=True),
    Case("disk-full", "training", _disk_full, "checkpoints/step-000001/training_state.pt: disk full while writing",
         "the disk filled up while a checkpoint or output was written (nothing half-written is kept)",
         "free space, or set output.dir on another disk", exit_code=1, run_folder=True),
    Case("resume-without-checkpoint", "training", _resume_no_checkpoint, "no complete checkpoint to resume from",
         "--resume on a folder that has no complete checkpoint", "set training.save_steps; resume a run that saved"),
    # other commands
    Case("eval-not-a-run", "cli", _eval_not_a_run, "just-a-folder: model folder has no config.json",
         "eval given a folder that is neither a run, an adapter nor a model", "pass the run folder (runs/NAME)"),
    Case("merge-not-a-run", "cli", _merge_not_a_run, "just-a-folder: not a loratune run folder",
         "merge given a folder that is not a run folder", "pass the folder that loratune train created under runs/"),
    Case("generate-prompts-missing", "cli", _generate_prompts_missing, "prompts.jsonl: prompts file not found",
         "generate --input names a file that does not exist", "give a JSONL file with one prompt per line"),
    Case("generate-no-prompt", "cli", _generate_no_prompt, "give either a prompt, or --input FILE with --output FILE",
         "generate with neither a prompt nor --input/--output", 'loratune generate runs/x "What is 2+2?"'),
    Case("inspect-bad-bits", "cli", _inspect_bad_bits, '--bits: unknown bit width "3"',
         "an option value outside its choices", "use one of the values listed"),
    Case("push-bad-repo-id", "cli", _push_bad_repo_id, '--repo-id: "not a repo" is not a Hub repository id',
         "push --repo-id that is not owner/name", "write --repo-id owner/name"),
]


# --- running a case through the real entry point ------------------------------------------------------------------------
def run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`loratune ARGV` through `loratune.cli.main`, in-process: (exit code, stdout, stderr)."""
    from loratune import cli

    monkeypatch.setattr(sys, "argv", ["loratune", *argv])
    monkeypatch.setitem(cli.STATE, "debug", False)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err


def leftovers(root: Path) -> list[Path]:
    """Temporary files an atomic write leaves only when it is itself killed: never after a clean error."""
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-phi-other"), "phi")


@pytest.fixture()
def env(tmp_path, tiny_llama_dir, other_model, monkeypatch) -> Env:
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))  # so cache writes are checked too
    monkeypatch.setenv("LORATUNE_DATA_CACHE", str(tmp_path / "cache" / "datasets"))
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, tiny_llama_dir, other_model, monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case: Case, env: Env, capsys, monkeypatch):
    if case.id == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    argv = case.setup(env)
    code, out, err = run_main(argv, capsys, monkeypatch)
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == case.exit_code, (code, out[-2000:], err[-2000:])
    assert len(error_lines) == 1, err
    assert case.expected in error_lines[0], error_lines[0]
    assert names_where(error_lines[0], env.root) or not case.names_where, error_lines[0]
    assert "Traceback" not in out + err
    assert leftovers(env.root) == []
    runs = [p for p in env.runs.iterdir()] if env.runs.is_dir() else []
    if not case.run_folder and case.id not in ("resume-without-checkpoint", "push-bad-repo-id"):
        assert runs == [], f"a failed start left a run folder: {runs}"


def names_where(line: str, root: Path) -> bool:
    """The line names a file under the case's folder, a config key (`data.split`) or a command-line option."""
    return (str(root) in line or re.search(r"\b(model|quantization|lora|data|training|output|speed)\.\w+", line)
            is not None or re.search(r"(^|\s)--[a-z]", line) is not None)


def test_names_where_can_fail():
    assert names_where("error: data.split: bad split", Path("/x")) and names_where("error: /x/c.yaml:3: bad", Path("/x"))
    assert not names_where("error: something went wrong (try again)", Path("/x"))


def test_debug_shows_the_traceback(env: Env, capsys, monkeypatch):
    from loratune import cli
    from loratune.errors import LoratuneError

    monkeypatch.setattr(sys, "argv", ["loratune", "--debug", "train", *_unknown_key(env)[1:]])
    with pytest.raises(LoratuneError, match="unknown key in training"):
        cli.main()
    cli.STATE["debug"] = False


def test_error_renders_where_key_what_and_fix_on_one_line():
    from loratune.errors import LoratuneError, choose

    error = LoratuneError("invalid value\n  (from a library)\n", file="c.yaml", line=4, column=7, key="lora.r",
                          hint="use a positive rank")
    assert str(error) == "c.yaml:4:7: lora.r: invalid value (from a library) (use a positive rank)"
    with pytest.raises(LoratuneError) as exc:
        choose("chatm", ["chatml", "phi2"], what="template", key="data.template")
    assert str(exc.value) == 'data.template: unknown template "chatm" (did you mean "chatml"? valid: chatml, phi2)'


def test_unexpected_exception_is_one_line_too(env: Env, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something deep broke\nsecond line")

    monkeypatch.setattr("loratune.train.load_model", boom)
    code, out, err = run_main(["train", str(env.config())], capsys, monkeypatch)
    assert code == 1
    assert err.strip().splitlines()[-1] == ("error: RuntimeError: something deep broke "
                                            "(rerun with --debug for the traceback)")
    assert "Traceback" not in out + err


# --- SIGINT during training: a subprocess, as a user presses Ctrl-C -------------------------------------------------------
def test_sigint_saves_a_resumable_checkpoint_then_resume_finishes(env: Env, capsys, monkeypatch):
    cfg = env.config(training={"max_steps": 400, "batch_size": 2})
    run = env.runs / "t"
    proc = subprocess.Popen([sys.executable, "-m", "loratune.cli", "train", str(cfg)], cwd=env.root,
                            env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and '"step": 2,' in (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "interrupted at step" in error_lines[0] and "--resume" in error_lines[0], err
    assert "Traceback" not in out + err
    from loratune.training.checkpoint import find_resume_checkpoint, list_checkpoints

    checkpoint = find_resume_checkpoint(run)
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < 400 and f"step {stopped_at};" in error_lines[0]
    assert leftovers(run) == [] and not (run / "summary.json").exists()
    assert list_checkpoints(run / "checkpoints")[-1] == checkpoint

    # --resume finishes the remaining steps (fewer of them: cut the run short through its saved config)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["training"]["max_steps"] = stopped_at + 2
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, out, err = run_main(["train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == stopped_at + 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# --- the server -----------------------------------------------------------------------------------------------------------
KEY = "sk-bad-input-key-0123"


@dataclass(frozen=True)
class ServerCase:
    id: str
    body: bytes | dict
    expected: str
    status: int
    cause: str
    fix: str
    headers: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {KEY}"),)


def _chat(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


SERVER_CASES: list[ServerCase] = [
    ServerCase("server-negative-max-tokens", _chat(max_tokens=-5), "max_tokens must be between 1 and 64, got -5", 400,
               "a request with max_tokens below 1 (or above the server's --max-tokens)", "send 1 <= max_tokens <= limit"),
    ServerCase("server-huge-prompt", _chat(messages=[{"role": "user", "content": "x" * 5000}]),
               "the prompt is", 413, "a prompt longer than --max-prompt-tokens (default: the context)",
               "shorten the prompt"),
    ServerCase("server-huge-body", _chat(messages=[{"role": "user", "content": "x" * 70_000}]),
               "request body is", 413, "a request body over the size limit (1 MiB by default)", "send a smaller body"),
    ServerCase("server-invalid-json", b'{"model": "tiny", "messages": [', "request body is not valid JSON", 400,
               "a body that is not JSON", "send a JSON object"),
    ServerCase("server-missing-field", {"model": "tiny"}, "messages: Field required", 400,
               "a chat request without messages", "send messages: [{role, content}]"),
    ServerCase("server-unknown-model", _chat(model="gpt-17"), "the model 'gpt-17' does not exist; this server serves "
               "'tiny'", 404, "a model name the server does not serve", "use the id from GET /v1/models"),
    ServerCase("server-missing-api-key", _chat(), "missing API key", 401,
               "no Authorization header on a server started with --api-key", "send 'Authorization: Bearer KEY'",
               headers=()),
    ServerCase("server-wrong-api-key", _chat(), "incorrect API key", 401, "a wrong API key",
               "send the key the server was started with", headers=(("authorization", "Bearer sk-wrong"),)),
]


@pytest.fixture(scope="module")
def server_client(tiny_llama_dir):
    from starlette.testclient import TestClient

    from loratune.generate import load_for_inference
    from loratune.serve.api import Limits, build

    im = load_for_inference(tiny_llama_dir, device="cpu")
    app = build(im, model_name="tiny", api_key=KEY, limits=Limits(max_body_bytes=64 * 1024, max_tokens=64,
                                                                   max_prompt_tokens=400))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("case", SERVER_CASES, ids=[c.id for c in SERVER_CASES])
def test_bad_request_gets_an_openai_error(case: ServerCase, server_client):
    body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    response = server_client.post("/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json", **dict(case.headers)})
    assert response.status_code == case.status, response.text
    error = response.json()["error"]
    assert case.expected in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert KEY not in response.text


def test_server_still_answers_after_bad_requests(server_client):
    response = server_client.post("/v1/chat/completions", json=_chat(), headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"


# --- the catalogue for users ----------------------------------------------------------------------------------------------
def catalogue() -> str:
    """docs/errors.md, generated from CASES and SERVER_CASES."""
    lines = [
        "# Errors",
        "",
        "Every mistake loratune can detect is reported as one line on stderr, `error: WHERE: WHAT (WHAT TO DO)`, with a",
        "non-zero exit code: 2 for input you can fix, 1 for an operating-system error (a full disk), 130 after Ctrl-C",
        "(a resumable checkpoint has been saved). WHERE is `file:line[:column]`, a config key (`training.batch_size`),",
        "a record field or a command-line option. Nothing half-written is left behind: files are written under a",
        "temporary name and renamed when complete. `loratune --debug ...` shows the full traceback instead.",
        "",
        "This page is generated from the test table in `tests/test_bad_input.py` (`python -m tests.test_bad_input >",
        "docs/errors.md`); a test fails when the two differ, so every entry below is checked by a test.",
        "",
    ]
    titles = {"config": "Config", "data": "Data", "model": "Model", "training": "Training", "cli": "Other commands"}
    for area, title in titles.items():
        lines += [f"## {title}", "", "| id | the line says | cause | what to do |", "|---|---|---|---|"]
        lines += [f"| `{c.id}` | `{c.expected}` | {c.cause} | {c.fix} |" for c in CASES if c.area == area]
        lines.append("")
    lines += ["## Training interrupted", "", "| id | the line says | cause | what to do |", "|---|---|---|---|",
              "| `sigint` | `interrupted at step N; checkpoint saved (continue with: loratune train --resume RUN)` | "
              "Ctrl-C (SIGINT) during training; exit code 130 | `loratune train --resume runs/NAME` continues exactly "
              "where it stopped |", ""]
    lines += ["## Server (`loratune serve`)", "",
              "The server answers with OpenAI's error body `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`, "
              "so the official clients raise their usual exceptions.", "",
              "| id | status | the message says | cause | what to do |", "|---|---|---|---|---|"]
    lines += [f"| `{c.id}` | {c.status} | `{c.expected}` | {c.cause} | {c.fix} |" for c in SERVER_CASES]
    lines.append("| `server-rate-limit` | 429 | `rate limit of N requests per minute reached` | more requests per "
                 "minute from one client than --rate-limit | wait for the Retry-After header's seconds |")
    lines.append("| `server-queue-full` | 429 | `the server is busy` | more waiting requests than --max-queue | "
                 "retry shortly |")
    return "\n".join(lines) + "\n"


def test_docs_errors_md_is_generated_from_this_table():
    assert len(CASES) + len(SERVER_CASES) >= 30
    assert len({c.id for c in CASES} | {c.id for c in SERVER_CASES}) == len(CASES) + len(SERVER_CASES)
    text = DOCS.read_text(encoding="utf-8")
    for case in [*CASES, *SERVER_CASES]:
        assert f"`{case.id}`" in text and case.expected in text, case.id
    assert text == catalogue(), "docs/errors.md is stale: python -m tests.test_bad_input > docs/errors.md"


if __name__ == "__main__":
    sys.stdout.write(catalogue())
