#!/usr/bin/env python3
"""Build a RANDOM Nemotron-H MoE model of realistic shape for speed benchmarks, and convert it to GGUF.

Run with the reference venv (scripts/setup-ref-env.sh) and the llama.cpp build (scripts/build-llama-cpp.sh):
    .venv-ref/bin/python tools/bench/make_nemotron_moe.py [--out models/bench] [--seed 1234]
                         [--force] [--skip-hf] [--no-check]
or simply tools/bench/make_nemotron_moe.sh (which also runs a short llama-bench smoke test).

Writes (models/ is git-ignored):
    models/bench/nemotron-h-moe-hf/       config.json, model.safetensors (bf16; A_log, D and the router's
                                          e_score_correction_bias in f32, as in NVIDIA's BF16 release),
                                          generation_config.json, byte-level fake tokenizer (256 tokens)
    models/bench/nemotron-h-moe.bf16.gguf llama.cpp's convert_hf_to_gguf.py (via tools/ref/convert_gguf.py), --outtype bf16
    models/bench/nemotron-h-moe.q8_0.gguf llama-quantize ... Q8_0
    models/bench/nemotron-h-moe.info.json shapes, parameter counts, file sizes, HF-vs-llama.cpp logit check

Shape: a 24-layer cut of the Nemotron 3 Nano 30B-A3B pattern at hidden 1024 (see CONFIG below):
    MEMEM*EMEMEM*EMEMEM*EMEM  = 11 Mamba-2, 10 MoE, 3 attention layers (attention at 5, 12, 19)
    32 routed experts top-4 (width 512, relu^2), 1 shared expert (width 1024), sigmoid router + correction bias,
    n_group 1 / topk_group 1, norm_topk_prob, routed_scaling_factor 2.5; Mamba-2 32 heads x 64 (d_inner 2048),
    8 groups, state 128, conv 4, chunk 128; attention 16 q / 2 kv heads x 64, no RoPE; vocab 131072, untied.

The weights are random (quality is irrelevant; the logits are finite and every op of the graph is exercised).
Everything is deterministic for a given --seed (own torch.Generator, no dependence on HF's init).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
LCPP = Path(os.environ.get("LLAMA_CPP_DIR") or REPO / ".cache" / "llama.cpp")

PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEM"
assert len(PATTERN) == 24

CONFIG = dict(
    vocab_size=131072,
    hidden_size=1024,
    hybrid_override_pattern=PATTERN,  # transformers turns it into layers_block_type (that is what gets saved)
    tie_word_embeddings=False,
    # attention (no RoPE in Nemotron-H)
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=262144,  # as in Nemotron 3 Nano
    attention_bias=False,
    # Mamba-2
    mamba_num_heads=32,
    mamba_head_dim=64,
    n_groups=8,
    ssm_state_size=128,
    conv_kernel=4,
    chunk_size=128,
    expand=2,  # unused by HF for d_inner (= mamba_num_heads * mamba_head_dim); 2 * 1024 = 2048 is consistent anyway
    use_conv_bias=True,
    mamba_hidden_act="silu",
    # MoE
    n_routed_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=512,
    n_shared_experts=1,
    moe_shared_expert_intermediate_size=1024,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    mlp_hidden_act="relu2",
    intermediate_size=1024,  # unused: there are no dense '-' layers
    # misc
    layer_norm_epsilon=1e-5,
    residual_in_fp32=False,
    initializer_range=0.02,
    use_cache=True,
)

STD = 0.02  # every weight matrix (embeddings, lm_head, projections, experts, router)


# ----------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[make_nemotron_moe] {msg}", flush=True)


def human(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.3f} GiB"


def count_params(cfg: dict) -> dict:
    """Parameter counts from the config alone (checked against the HF model below)."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, P, G, N, K = cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["n_groups"], cfg["ssm_state_size"], cfg["conv_kernel"]
    d_inner = nh * P
    conv_dim = d_inner + 2 * G * N
    mamba = (H * (2 * d_inner + 2 * G * N + nh)  # in_proj: z, x, B, C, dt
             + conv_dim * K + conv_dim           # conv1d weight + bias
             + 3 * nh                            # A_log, D, dt_bias
             + d_inner                           # gated norm
             + d_inner * H)                      # out_proj
    hq, hkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = H * hq * hd + 2 * H * hkv * hd + hq * hd * H
    E, k, I, Ish = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["moe_shared_expert_intermediate_size"]
    expert = 2 * H * I
    moe_total = E * expert + 2 * H * Ish + E * H  # experts + shared expert + router weight (the bias is a buffer)
    moe_active = k * expert + 2 * H * Ish + E * H
    n = {c: PATTERN.count(c) for c in "ME*"}
    block_norms = len(PATTERN) * H
    embed, head = V * H, V * H
    body_total = n["M"] * mamba + n["*"] * attn + n["E"] * moe_total + block_norms + H  # + norm_f
    body_active = n["M"] * mamba + n["*"] * attn + n["E"] * moe_active + block_norms + H
    return {
        "layers": {"mamba2": n["M"], "moe": n["E"], "attention": n["*"]},
        "per_layer": {"mamba2": mamba, "attention": attn, "moe_total": moe_total, "moe_active": moe_active,
                      "one_routed_expert": expert},
        "embeddings": embed,
        "lm_head": head,
        "total": embed + head + body_total,
        "active_per_token": embed + head + body_active,  # embedding row lookup counted in full, as usual
        "total_non_embedding": head + body_total,
        "active_per_token_non_embedding": head + body_active,  # lm_head is a real matmul per token
        "total_body_only": body_total,
        "active_body_only": body_active,
        "router_bias_buffer": n["E"] * E,
    }


def build_model(seed: int):
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM
    from transformers.initialization import no_init_weights

    cfg = NemotronHConfig(**CONFIG, dtype=torch.bfloat16)
    assert "".join({"linear_attention": "M", "moe": "E", "full_attention": "*"}[t] for t in cfg.layers_block_type) == PATTERN
    with no_init_weights():  # we set every tensor ourselves; skip HF's (slow, fp32-free anyway) init
        model = NemotronHForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.eval()

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)

    def randn(shape, std):  # fp32 draw of one tensor at a time, then cast (largest temp: 131072x1024 fp32 = 512 MiB)
        return torch.randn(shape, generator=g, dtype=torch.float32).mul_(std)

    def unif(shape, lo, hi):
        return torch.rand(shape, generator=g, dtype=torch.float32).mul_(hi - lo).add_(lo)

    nh = cfg.mamba_num_heads
    t_min, t_max = cfg.time_step_min, cfg.time_step_max  # 0.001, 0.1
    with torch.no_grad():
        for name, p in model.named_parameters():  # registration order: deterministic
            if name.endswith(("norm.weight", "norm_f.weight")):
                v = torch.ones(p.shape)  # block norms, norm_f and the Mamba gated norm: unit
            elif name.endswith("mixer.A_log"):
                v = torch.log(unif(p.shape, 1.0, 16.0))  # A = -exp(A_log) in [-16, -1]
            elif name.endswith("mixer.D"):
                v = torch.ones(p.shape)
            elif name.endswith("mixer.dt_bias"):
                # Mamba-2 init: dt ~ log-uniform(0.001, 0.1), dt_bias = softplus^-1(dt)
                dt = torch.exp(unif(p.shape, math.log(t_min), math.log(t_max)))
                v = dt + torch.log(-torch.expm1(-dt))
            elif name.endswith("mixer.conv1d.weight"):
                v = unif(p.shape, -0.5, 0.5)  # ~ PyTorch's default for a depthwise conv of width 4 (bound 1/sqrt(4))
            elif name.endswith("mixer.conv1d.bias"):
                v = unif(p.shape, -0.5, 0.5) * 0.1
            elif p.dim() >= 2:  # embeddings, lm_head, in/out_proj, q/k/v/o, experts, shared expert, router
                v = randn(p.shape, STD)
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("gate.e_score_correction_bias"):
                # f32, as from_pretrained keeps it (_keep_in_fp32_modules_strict); random so selection depends on it
                b.data = unif(b.shape, -0.1, 0.1)
    return model


def hf_forward(model, tokens: list[int]):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float()


def hf_reference(hf_dir: Path, tokens: list[int]):
    """Reload the saved checkpoint with from_pretrained in fp32 (weights are the bf16 values, exactly) and run it
    with HF's prefill-only clamp Δ >= time_step_min turned off. llama.cpp, HF's own decode path and the CUDA kernels
    do not clamp; with this init some heads sit at Δ ~ 0.001, so the clamp alone moves the logits by ~2e-3."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    assert model.model.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    for layer in model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    logits = hf_forward(model, tokens)
    del model
    return logits


def save_hf(model, hf_dir: Path) -> None:
    sd = model.state_dict()
    # NVIDIA's BF16 release stores A_log, D and e_score_correction_bias in F32 (the rest in BF16); mirror that.
    sd = {k: (v.float() if k.endswith(("mixer.A_log", "mixer.D", "e_score_correction_bias")) else v) for k, v in sd.items()}
    model.save_pretrained(hf_dir, state_dict=sd, max_shard_size="20GB")
    sys.path.insert(0, str(REPO / "tools" / "ref"))
    from gen_fixtures import write_tokenizer  # byte-level GPT-2 style, 256 tokens, id = byte, no merges

    write_tokenizer(hf_dir)


def check_safetensors(hf_dir: Path, expect_total: int) -> dict:
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    keys, total, dtypes = {}, 0, {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                shape, dt = list(sl.get_shape()), sl.get_dtype()
                keys[k] = (shape, dt)
                total += math.prod(shape)
                dtypes[dt] = dtypes.get(dt, 0) + 1
    assert any(k.startswith("backbone.layers.1.mixer.experts.31.up_proj.weight") for k in keys), \
        "expected the hub layout (backbone.*, one tensor per expert)"
    assert total == expect_total, (total, expect_total)
    f32 = sorted({k.split(".")[-1] for k, (_, dt) in keys.items() if dt == "F32"})
    log(f"safetensors: {len(files)} file(s), {len(keys)} tensors, {total:,} elements, dtypes {dtypes}, F32 kinds {f32}")
    return {"files": [f.name for f in files], "n_tensors": len(keys), "dtypes": dtypes}


def run(cmd: list[str], **kw) -> None:
    log("+ " + " ".join(map(str, cmd)))
    subprocess.run(list(map(str, cmd)), check=True, **kw)


def gguf_summary(path: Path) -> dict:
    sys.path.insert(0, str(LCPP / "gguf-py"))
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    r = GGUFReader(str(path))
    meta = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        if name.startswith("tokenizer.ggml.") and f.types and f.types[0] == GGUFValueType.ARRAY:
            meta[name] = f"[{len(f.data)} entries]"
            continue
        v = f.contents()
        meta[name] = v
    types, kinds = {}, {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        kind = ".".join("N" if x.isdigit() else x for x in t.name.split("."))
        kinds.setdefault(kind, (list(map(int, t.shape)), t.tensor_type.name))
    return {"metadata": meta, "n_tensors": len(r.tensors), "tensor_types": types, "tensor_kinds": kinds}


def lcpp_logits(gguf_path: Path, tokens: list[int]):
    import numpy as np

    sys.path.insert(0, str(REPO / "tools" / "ref"))
    from check_gguf import build_helper, run_helper  # .cache/ref/lcpp_logits: f32 KV, flash attention off, 2 threads

    exe = build_helper(LCPP.resolve(), REPO / ".cache" / "ref" / "lcpp_logits")
    return np.asarray(run_helper(exe, gguf_path, tokens, 0), dtype=np.float64)


def compare(name: str, ref, got) -> dict:
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    finite = bool(np.isfinite(got).all())
    d = np.abs(got - ref)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    corr = float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
    res = {"finite": finite, "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
           "max_abs_logit": float(np.abs(ref).max()), "corr": corr, "top1_agree": top1}
    log(f"{name} vs HF fp32: finite {finite}, max|Δ| {res['max_abs_diff']:.4g} (max|logit| {res['max_abs_logit']:.3g}), "
        f"mean|Δ| {res['mean_abs_diff']:.3g}, corr {corr:.5f}, top-1 agree {top1:.2f}")
    assert finite, f"{name}: non-finite logits"
    assert corr > 0.95, f"{name}: llama.cpp logits do not track HF (corr {corr})"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "bench")
    ap.add_argument("--name", default="nemotron-h-moe")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    ap.add_argument("--skip-hf", action="store_true", help="reuse the existing HF folder (only convert/quantize/check)")
    ap.add_argument("--no-check", action="store_true", help="skip the HF-vs-llama.cpp logit check")
    ap.add_argument("--check-f32", action="store_true",
                    help="also convert a temporary f32 GGUF (2.9 GB) and require max|Δ| < 1e-4 against HF fp32")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()

    out = args.out.resolve()
    hf_dir = out / f"{args.name}-hf"
    bf16 = out / f"{args.name}.bf16.gguf"
    q8 = out / f"{args.name}.q8_0.gguf"
    info_path = out / f"{args.name}.info.json"
    out.mkdir(parents=True, exist_ok=True)
    quantize = LCPP / "build" / "bin" / "llama-quantize"
    for p in (LCPP / "convert_hf_to_gguf.py", quantize):
        if not p.is_file():
            sys.exit(f"{p} missing: run scripts/build-llama-cpp.sh")

    counts = count_params(CONFIG)
    # 32 token ids (the fake tokenizer only knows 0..255; llama-bench draws ids over the whole vocab anyway)
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, CONFIG["vocab_size"], (32,), generator=g).tolist()
    info = {"seed": args.seed, "pattern": PATTERN, "params": counts, "check_tokens": tokens,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    t0 = time.time()
    have_hf = (hf_dir / "config.json").is_file() and any(hf_dir.glob("*.safetensors"))
    ref_path = out / f"{args.name}.hf-logits.pt"
    if args.skip_hf and have_hf:
        log(f"reusing {hf_dir}")
        if not ref_path.is_file() and not args.no_check:
            torch.save(hf_reference(hf_dir, tokens), ref_path)
    elif have_hf and not args.force and ref_path.is_file():
        log(f"{hf_dir} exists (use --force to rebuild)")
    else:
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        log(f"building the random model (seed {args.seed}) in bf16 ...")
        model = build_model(args.seed)
        n_hf = sum(p.numel() for p in model.parameters())
        assert n_hf == counts["total"], (n_hf, counts["total"])
        logits = hf_forward(model, tokens)
        assert torch.isfinite(logits).all(), "HF: non-finite logits"
        log(f"HF bf16 forward (32 tokens, {time.time() - t0:.1f}s so far): logits std {logits.std():.3f}, "
            f"max|.| {logits.abs().max():.3f}, distinct argmax {len(set(logits.argmax(-1).tolist()))}/32")
        save_hf(model, hf_dir)
        del model
        log(f"saved {hf_dir} ({time.time() - t0:.1f}s)")
        ref = hf_reference(hf_dir, tokens)
        assert torch.isfinite(ref).all(), "HF fp32: non-finite logits"
        torch.save(ref, ref_path)
        log(f"HF fp32 reference from the saved folder ({time.time() - t0:.1f}s): logits std {ref.std():.3f}, "
            f"max|.| {ref.abs().max():.3f}")
    info["safetensors"] = check_safetensors(hf_dir, counts["total"] + counts["router_bias_buffer"])
    info["config_json"] = json.loads((hf_dir / "config.json").read_text())

    # ---- GGUF (bf16) via llama.cpp's converter, with tools/ref/convert_gguf.py's monkeypatches
    if args.force or not bf16.is_file() or bf16.stat().st_mtime < (hf_dir / "config.json").stat().st_mtime:
        tmp = bf16.with_suffix(".tmp")
        run([PY, REPO / "tools/ref/convert_gguf.py", hf_dir, "--outtype", "bf16", "--outfile", tmp,
             "--model-name", f"{args.name}-random-bench"])
        tmp.rename(bf16)
    # ---- Q8_0
    if args.force or not q8.is_file() or q8.stat().st_mtime < bf16.stat().st_mtime:
        tmp = q8.with_suffix(".tmp")
        res = subprocess.run(list(map(str, [quantize, bf16, tmp, "Q8_0", "2"])), capture_output=True, text=True)
        log(f"+ {quantize} {bf16} {tmp} Q8_0 2")
        if res.returncode != 0:
            sys.exit(f"llama-quantize failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        log("  " + "\n  ".join(l for l in res.stderr.splitlines() if "quantize_impl:" in l and "size" in l))
        tmp.rename(q8)

    for p in (bf16, q8):
        s = gguf_summary(p)
        md = s["metadata"]
        assert md["general.architecture"] == "nemotron_h_moe", md["general.architecture"]
        assert md["tokenizer.ggml.tokens"] == f"[{CONFIG['vocab_size']} entries]", md["tokenizer.ggml.tokens"]
        kinds = s["tensor_kinds"]
        assert kinds["token_embd.weight"][0] == [CONFIG["hidden_size"], CONFIG["vocab_size"]]
        assert kinds["output.weight"][0] == [CONFIG["hidden_size"], CONFIG["vocab_size"]]
        info[p.name] = {"bytes": p.stat().st_size, **s}

    if not args.no_check:
        ref = torch.load(ref_path).numpy()
        info["check"] = {p.name: compare(p.name, ref, lcpp_logits(p, tokens)) for p in (bf16, q8)}
        if args.check_f32:
            f32 = out / f"{args.name}.f32.tmp.gguf"
            try:
                run([PY, REPO / "tools/ref/convert_gguf.py", hf_dir, "--outtype", "f32", "--outfile", f32],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                res = compare("f32 GGUF", ref, lcpp_logits(f32, tokens))
                info["check"]["f32"] = res
                assert res["max_abs_diff"] < 1e-4, "f32 GGUF does not match HF fp32"
            finally:
                f32.unlink(missing_ok=True)

    st_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    info["sizes"] = {"safetensors": st_bytes, bf16.name: bf16.stat().st_size, q8.name: q8.stat().st_size}
    info_path.write_text(json.dumps(info, indent=1, default=str) + "\n")

    c = counts
    print()
    print(f"pattern {PATTERN}: {c['layers']['mamba2']} Mamba-2, {c['layers']['moe']} MoE, {c['layers']['attention']} attention")
    print(f"parameters total           {c['total']:>13,}  ({c['total'] / 1e6:.1f} M)")
    print(f"parameters active / token  {c['active_per_token']:>13,}  ({c['active_per_token'] / 1e6:.1f} M)")
    print(f"  without token_embd       {c['total_non_embedding']:>13,} total, {c['active_per_token_non_embedding']:>13,} active")
    print(f"  body only (no embd/head) {c['total_body_only']:>13,} total, {c['active_body_only']:>13,} active")
    print(f"  per layer: mamba2 {c['per_layer']['mamba2']:,}  attention {c['per_layer']['attention']:,}  "
          f"moe {c['per_layer']['moe_total']:,} (active {c['per_layer']['moe_active']:,})")
    print(f"HF safetensors   {hf_dir.relative_to(REPO) if hf_dir.is_relative_to(REPO) else hf_dir}: {human(st_bytes)} ({st_bytes:,} B)")
    for p in (bf16, q8):
        n = p.stat().st_size
        print(f"GGUF {p.name:<28} {human(n)} ({n:,} B, {8 * n / c['total']:.2f} bits/param)")
    print(f"info: {info_path}")
    log(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
