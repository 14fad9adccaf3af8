"""PyTorch CPU reference for `elastica train` throughput: one distillation step on SmolLM2-135M's
architecture (LlamaForCausalLM, fp32) = frozen-teacher forward + student forward/backward with the
same forward-KL loss at a temperature + AdamW, at the same batch and sequence length.
Weights are random (speed does not depend on them). Prints JSON with tokens/s.
Usage: .venv-ref/bin/python tools/bench/train_step_torch.py [--batch 4] [--seq 256] [--steps 6] [--threads 2]
"""
import argparse, json, time
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--temp", type=float, default=1.0)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa")
teacher = LlamaForCausalLM(cfg).eval()
student = LlamaForCausalLM(cfg)
student.load_state_dict(teacher.state_dict())
opt = torch.optim.AdamW(student.parameters(), lr=9e-5, betas=(0.9, 0.95), weight_decay=0.0)
times = []
for step in range(a.warmup + a.steps):
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    t0 = time.perf_counter()
    with torch.no_grad():
        zt = teacher(ids).logits
    zs = student(ids).logits
    T = a.temp
    loss = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), log_target=True, reduction="batchmean") * T * T
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    dt = time.perf_counter() - t0
    if step >= a.warmup:
        times.append(dt)
times.sort()
med = times[len(times) // 2]
print(json.dumps({"torch": torch.__version__, "threads": a.threads, "batch": a.batch, "seq": a.seq,
                  "median_step_s": med, "tok_per_s": a.batch * a.seq / med}))
