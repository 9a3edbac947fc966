# ruff: noqa  -- verbatim copy of ../shared/bench (the reference baseline), edits marked 'loratune bench'
"""Unsloth (peer anchor) on the same synthetic workload as gpu_baseline.py: QLoRA, batch 4, pad to 1024,
lengths U[128,1024], r=32 alpha=64, Unsloth's recommended dropout 0 and use_gradient_checkpointing="unsloth"."""
import os, sys, time, json, random, argparse
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
import unsloth  # must come before transformers
from unsloth import FastLanguageModel
import torch
sys.path.insert(0, os.path.dirname(__file__))
import seed_recipe_gpu as gb

p = argparse.ArgumentParser()
p.add_argument("--arch", default="llama1b"); p.add_argument("--bs", type=int, default=4)
p.add_argument("--steps", type=int, default=25); p.add_argument("--maxlen", type=int, default=1024)
p.add_argument("--minlen", type=int, default=128); p.add_argument("--pad", default="max")
a = p.parse_args()
path = f"/tmp/{a.arch}-random"
gb.make_model_dir(a.arch, path)
model, tok = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=a.maxlen, load_in_4bit=True,
                                               dtype=torch.bfloat16)
targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"] if a.arch == "phi2" else \
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0, bias="none",
                                         target_modules=targets, use_gradient_checkpointing="unsloth")
lens = gb.lengths(a.steps * a.bs, a.minlen, a.maxlen)
vocab = model.config.vocab_size
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
model.train()
times, losses = [], []
torch.cuda.reset_peak_memory_stats()
for s in range(a.steps):
    b = lens[s * a.bs:(s + 1) * a.bs]
    m = a.maxlen if a.pad == "max" else max(b)
    ids = torch.zeros(a.bs, m, dtype=torch.long); att = torch.zeros(a.bs, m, dtype=torch.long); lab = torch.full((a.bs, m), -100)
    for i, L in enumerate(b):
        x = torch.randint(0, vocab, (L,), generator=torch.Generator().manual_seed(s * a.bs + i))
        ids[i, :L] = x; att[i, :L] = 1; lab[i, :L] = x
    ids, att, lab = ids.cuda(), att.cuda(), lab.cuda()
    torch.cuda.synchronize(); t = time.perf_counter()
    out = model(input_ids=ids, attention_mask=att, labels=lab)
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    losses.append(out.loss.item())  # after the timed region: the loss-at-step-N check
w = 5; tt = sum(times[w:]); ns = a.steps - w
real = sum(lens[w * a.bs:]) / tt
proc = a.bs * (a.maxlen if a.pad == "max" else 0) * ns / tt if a.pad == "max" else real
res = dict(variant=f"unsloth_{a.arch}_nf4_gc_bs{a.bs}_{a.pad}", unsloth=unsloth.__version__, step_s=round(tt / ns, 4),
           tokens_per_s_real=round(real), tokens_per_s_processed=round(proc),
           peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss_last=round(out.loss.item(), 4),
           loss_last5=round(sum(losses[-5:]) / len(losses[-5:]), 4), steps=a.steps, warmup=w,
           gpu=torch.cuda.get_device_name())
print("RESULT " + json.dumps(res), flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "results.jsonl"), "a") as f:
    f.write(json.dumps(res) + "\n")
