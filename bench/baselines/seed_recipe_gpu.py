# ruff: noqa  -- verbatim copy of ../shared/bench (the reference baseline), edits marked 'loratune bench'
"""Seed-recipe QLoRA baseline on one GPU: Phi-2 architecture (random weights), HF Trainer + peft + bitsandbytes.

Measures tokens/s (padded and real), peak GPU memory, and model-FLOPs utilisation for variants of the
recipe the seed documents describe. Weights are random: throughput and memory do not depend on values.
"""
import argparse, json, os, time, random, math
import torch

PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
            partial_rotary_factor=0.4, rope_theta=10000.0, layer_norm_eps=1e-5, resid_pdrop=0.1,
            embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new", tie_word_embeddings=False)
LLAMA1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=100000.0, tie_word_embeddings=True)


def make_model_dir(arch, path):
    from transformers import PhiConfig, PhiForCausalLM, LlamaConfig, LlamaForCausalLM
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        return
    cfg = PhiConfig(**PHI2) if arch == "phi2" else LlamaConfig(**(LLAMA1B if arch == "llama1b" else SMOL))
    cls = PhiForCausalLM if arch == "phi2" else LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = cls(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    save_synthetic_tokenizer(path, cfg.vocab_size)
    del m
    torch.cuda.empty_cache()


def save_synthetic_tokenizer(path, vocab_size):
    """A word-level tokenizer with exactly vocab_size tokens, for tools that insist on a tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def lengths(n, lo, hi, seed=0):
    rnd = random.Random(seed)
    return [rnd.randint(lo, hi) for _ in range(n)]


def run(a):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments, TrainerCallback
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if a.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    path = f"/tmp/{a.arch}-random"
    make_model_dir(a.arch, path)
    kw = dict(dtype=torch.bfloat16, device_map={"": 0}, attn_implementation=a.attn)
    if a.quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    elif a.quant == "int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if a.quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gc)
    elif a.gc:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"] if a.arch == "phi2" else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.05, bias="none",
                                             task_type="CAUSAL_LM", target_modules=targets))
    ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nbase = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    lens = lengths(a.steps * a.bs * 2, a.minlen, a.maxlen)
    vocab = model.config.vocab_size

    class DS(torch.utils.data.Dataset):
        def __len__(self): return len(lens)
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            L = lens[i]
            ids = torch.randint(0, vocab, (L,), generator=g)
            pad = a.maxlen - L if a.pad == "max" else 0
            input_ids = torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
            att = torch.cat([torch.ones(L, dtype=torch.long), torch.zeros(pad, dtype=torch.long)])
            labels = torch.cat([ids, torch.full((pad,), -100)])
            return dict(input_ids=input_ids, attention_mask=att, labels=labels)

    def collate(b):
        m = max(x["input_ids"].numel() for x in b)
        out = {}
        for k, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            out[k] = torch.stack([torch.cat([x[k], torch.full((m - x[k].numel(),), fill)]) for x in b])
        return out

    times, toks, real = [], [], []
    losses = []  # loratune bench: the per-step training loss (logging_steps=1), for the loss-at-step-50 check

    class CB(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize(); self.t = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize(); times.append(time.perf_counter() - self.t)
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(output_dir="/tmp/out", per_device_train_batch_size=a.bs, max_steps=a.steps,
                             learning_rate=2e-4, bf16=True, logging_steps=1, save_strategy="no",
                             report_to=[], optim=a.optim, gradient_checkpointing=False,
                             dataloader_num_workers=2, disable_tqdm=True,
                             remove_unused_columns=False)
    tr = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collate, callbacks=[CB()])
    torch.cuda.reset_peak_memory_stats()
    tr.train()
    warm = 5
    t = sum(times[warm:])
    ns = a.steps - warm
    # tokens per step: padded = bs*maxlen if pad=max, real = mean(lens)*bs
    mean_real = sum(lens[: a.steps * a.bs]) / (a.steps * a.bs)
    padded_per_step = a.bs * (a.maxlen if a.pad == "max" else mean_real)
    real_tps = mean_real * a.bs * ns / t
    pad_tps = padded_per_step * ns / t
    # model FLOPs per processed token: fwd 2N + bwd(activation grads) 2N (+ recompute 2N counted as overhead, not useful)
    n_lin = nbase - model.config.vocab_size * model.config.hidden_size  # exclude input embedding lookup
    useful = 4 * n_lin
    mfu = pad_tps * useful / 989e12
    res = dict(variant=a.name, liger=a.liger, arch=a.arch, quant=a.quant, gc=a.gc, bs=a.bs, pad=a.pad, maxlen=a.maxlen,
               minlen=a.minlen, attn=a.attn, optim=a.optim, step_s=round(t / ns, 4), tokens_per_s_processed=round(pad_tps),
               tokens_per_s_real=round(real_tps), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               trainable=ntrain, base_params=nbase, mfu_processed_vs_989=round(mfu, 3),
               torch=torch.__version__, loss_last=round(losses[-1], 4) if losses else None,
               loss_last5=round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None,
               steps=a.steps, warmup=warm, gpu=torch.cuda.get_device_name())
    print("RESULT " + json.dumps(res), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "results.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")


def ceiling():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): a @ b
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
    r = dict(variant="matmul_ceiling", tflops=round(2 * 8192**3 / dt / 1e12, 1), gpu=torch.cuda.get_device_name())
    print("RESULT " + json.dumps(r), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "results.jsonl"), "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="seed")
    p.add_argument("--arch", default="phi2")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--gc", type=int, default=1)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--minlen", type=int, default=128)
    p.add_argument("--maxlen", type=int, default=1024)
    p.add_argument("--pad", default="max")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--ceiling", action="store_true")
    p.add_argument("--liger", type=int, default=0)
    a = p.parse_args()
    ceiling() if a.ceiling else run(a)
