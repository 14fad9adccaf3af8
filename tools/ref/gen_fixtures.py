#!/usr/bin/env python3
"""Generate the tiny random HF checkpoints + reference logits used by elastica's Rust tests.

Run with the reference venv (scripts/setup-ref-env.sh):
    .venv-ref/bin/python tools/ref/gen_fixtures.py [--out tests/fixtures] [--only NAME ...]

Writes, per fixture folder under tests/fixtures/:
    config.json           HF config (see README.md for the per-fixture form)
    model.safetensors     fp32, written by save_pretrained (hub key layout)
    tokenizer.json        minimal byte-level GPT-2 style tokenizer (256 byte tokens, no merges)
    tokenizer_config.json
    reference.json        {"tokens": [...], "logits": [[vocab floats] per position]} (full fp32 forward, no cache)
    reference_meta.json   versions, seeds, checks

Everything is deterministic (fixed seeds, no dependence on torch's global RNG state for weights).
Checks done here (the script fails loudly if any fails):
  * Nemotron-H: every Mamba Δ = softplus(dt + dt_bias) >= 10 * time_step_min (HF's torch fallback clamps
    Δ at time_step_min in prefill but not in decode, other implementations never clamp; keep away from it).
  * Nemotron-H MoE: e_score_correction_bias and group-limited routing both change the expert selection
    for some tokens (otherwise they would not be tested).
  * Saved safetensors have the hub key layout (backbone.*, one tensor per expert).
  * Reloading the folder with from_pretrained reproduces the logits exactly.
  * Prefill + one-token cached decode steps reproduce the full-forward logits (max diff printed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
)

transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 24
PREFILL_LEN = 13  # for the cache check: 13-token prefill (1 full chunk + a partial one), then 11 decode steps


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def normal_(t: torch.Tensor, std: float, g: torch.Generator) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * std)


def uniform_(t: torch.Tensor, lo: float, hi: float, g: torch.Generator) -> None:
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float32) * (hi - lo) + lo)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer(folder: Path) -> None:
    """Byte-level BPE tokenizer whose token id i is the raw byte i (256 tokens, no merges, no specials)."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    # self-check: round trip through the real tokenizer
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(folder)
    text = "Hello, wörld! 🚀"
    ids = t.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8")), (ids, list(text.encode("utf-8")))
    assert t.decode(ids) == text


def f32_json(x: np.float32) -> str:
    """Shortest decimal that round-trips the float32 value (numpy's dragon4), e.g. 1.2345678."""
    r = np.format_float_positional(x, unique=True, trim="-") if abs(x) >= 1e-4 or x == 0 else \
        np.format_float_scientific(x, unique=True, trim="-")
    assert np.float32(float(r)) == x, (x, r)
    return r


def dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def safetensors_keys(path: Path) -> dict[str, tuple[list[int], str]]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (list(sl.get_shape()), sl.get_dtype())
    return out


def full_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=tokens[None], use_cache=False)
    return out.logits[0].float()


def cached_forward(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens with a cache, then feed the rest one token at a time."""
    rows = []
    with torch.no_grad():
        out = model(input_ids=tokens[None, :prefill], use_cache=True)
        rows.append(out.logits[0].float())
        pkv = out.past_key_values
        for t in range(prefill, tokens.shape[0]):
            out = model(
                input_ids=tokens[None, t : t + 1],
                past_key_values=pkv,
                use_cache=True,
                cache_position=torch.tensor([t]),
            )
            pkv = out.past_key_values
            rows.append(out.logits[0].float())
    return torch.cat(rows, dim=0)


def set_eager(model) -> None:
    """Plain eager attention and the plain per-expert loop (not sdpa / grouped_mm) for the reference."""
    model.set_attn_implementation("eager")
    if "@use_experts_implementation" in Path(sys.modules[type(model).__module__].__file__).read_text():
        model.set_experts_implementation("eager")
    assert model.config._attn_implementation == "eager"


def impls(model) -> dict:
    return {"attn_implementation": model.config._attn_implementation,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}


def fp64_diff(model, tokens: torch.Tensor, logits: torch.Tensor) -> float:
    """Max |fp32 logits - same model run in float64| (noise floor; HF's Mamba2 scan casts to fp32 inside)."""
    import copy

    m64 = copy.deepcopy(model).double()
    set_eager(m64)
    with torch.no_grad():
        l64 = m64(input_ids=tokens[None], use_cache=False).logits[0]
    d = (l64 - logits.double()).abs().max().item()
    print(f"  fp32 reference vs float64 run of the same model: max |Δ| {d:.3g}")
    return d


def check_logits_sane(name: str, logits: torch.Tensor) -> dict:
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits"
    std = logits.std().item()
    amax = logits.abs().max().item()
    # spread across positions: the argmax should not be the same token everywhere
    n_argmax = len(set(logits.argmax(-1).tolist()))
    probs = logits.softmax(-1)
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
    print(f"  logits: std {std:.3f}  max|.| {amax:.3f}  distinct argmax {n_argmax}/{logits.shape[0]}  "
          f"mean entropy {ent:.3f} nats (uniform {math.log(logits.shape[1]):.3f})")
    assert 0.5 < std < 20 and amax < 100, f"{name}: degenerate logit scale"
    assert n_argmax >= 4, f"{name}: argmax nearly constant across positions"
    return {"std": std, "max_abs": amax, "distinct_argmax": n_argmax, "mean_entropy": ent}


def write_reference(folder: Path, tokens: torch.Tensor, logits: torch.Tensor) -> None:
    arr = logits.detach().to(torch.float32).numpy()
    rows = ",\n".join("[" + ",".join(f32_json(v) for v in row) + "]" for row in arr)
    text = '{"tokens":[' + ",".join(str(int(t)) for t in tokens.tolist()) + '],\n"logits":[\n' + rows + "\n]}\n"
    (folder / "reference.json").write_text(text)
    # round-trip check: parsing the json (as float64, then rounding to float32) gives exactly the float32 logits
    back = json.loads((folder / "reference.json").read_text())
    assert back["tokens"] == [int(t) for t in tokens.tolist()]
    got = np.asarray(back["logits"], dtype=np.float64).astype(np.float32)
    assert got.shape == arr.shape
    assert np.array_equal(got, arr), "reference.json does not round-trip the float32 logits"


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------
# Nemotron-H
# ----------------------------------------------------------------------------------------------

NH_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    tie_word_embeddings=False,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    intermediate_size=96,
    mlp_hidden_act="relu2",
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    expand=2,
    use_conv_bias=True,
    layer_norm_epsilon=1e-5,
    use_cache=True,
)

NH_MOE = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
)

# Keys that only describe MoE blocks; removed from the (hub-style) dense config.json.
MOE_ONLY_KEYS = [
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
    "n_shared_experts", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "moe_latent_size",
    "moe_shared_expert_overlap", "output_router_logits", "num_nextn_predict_layers", "mtp_layers_block_type",
]


def init_nemotron_h(model: NemotronHForCausalLM, seed: int) -> None:
    """Deterministic non-degenerate init (independent of HF's _init_weights)."""
    cfg = model.config
    g = gen(seed)
    H = cfg.hidden_size
    nh = cfg.mamba_num_heads
    d_inner = nh * cfg.mamba_head_dim
    for name, p in model.named_parameters():  # registration order: deterministic
        if name.endswith("embeddings.weight"):
            normal_(p, 0.5, g)
        elif name == "lm_head.weight":
            normal_(p, 0.3, g)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            # block norms, norm_f and the Mamba gated norm: non-trivial per-channel scales
            uniform_(p, 0.7, 1.3, g)
        elif name.endswith("mixer.in_proj.weight"):
            normal_(p, 1.0 / math.sqrt(H), g)
            with torch.no_grad():  # dt rows (last nh): small, so Δ stays inside a sane range
                p[-nh:].copy_(torch.randn((nh, H), generator=g) * 0.03)
        elif name.endswith("mixer.conv1d.weight"):
            normal_(p, 0.35, g)
        elif name.endswith("mixer.conv1d.bias"):
            normal_(p, 0.1, g)
        elif name.endswith("mixer.dt_bias"):
            uniform_(p, -2.0, 1.0, g)  # softplus -> ~0.13 .. 1.31
        elif name.endswith("mixer.A_log"):
            with torch.no_grad():
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 2.7 + 0.3))  # A in [0.3, 3]
        elif name.endswith("mixer.D"):
            uniform_(p, -0.5, 1.5, g)
        elif name.endswith("mixer.out_proj.weight"):
            normal_(p, 1.0 / math.sqrt(d_inner), g)
        elif name.endswith(("mixer.q_proj.weight", "mixer.k_proj.weight")):
            normal_(p, 0.2, g)
        elif name.endswith("mixer.v_proj.weight"):
            normal_(p, 1.0 / math.sqrt(H), g)
        elif name.endswith("mixer.o_proj.weight"):
            normal_(p, 1.0 / math.sqrt(p.shape[1]), g)
        elif name.endswith("up_proj.weight") or name.endswith("experts.up_proj"):
            normal_(p, 1.0 / math.sqrt(p.shape[-1]), g)
        elif name.endswith("down_proj.weight") or name.endswith("experts.down_proj"):
            normal_(p, 1.0 / math.sqrt(p.shape[-1]), g)
        elif name.endswith("mixer.gate.weight"):
            normal_(p, 0.25, g)
        else:
            raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
    for name, b in model.named_buffers():
        if name.endswith("gate.e_score_correction_bias"):
            uniform_(b, -0.25, 0.25, g)  # default is zeros; make it matter


class MambaDtProbe:
    """Hooks every Mamba2 mixer's in_proj and records Δ = softplus(dt + dt_bias) (fp32, before any clamp)."""

    def __init__(self, model):
        self.handles = []
        self.deltas: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            mixer = layer.mixer
            if type(mixer).__name__ != "NemotronHMamba2Mixer":
                continue
            self.handles.append(mixer.in_proj.register_forward_hook(self._hook(i, mixer)))

    def _hook(self, i, mixer):
        def fn(mod, inp, out):
            dt = out[..., -mixer.num_heads:].float()
            delta = F.softplus(dt + mixer.dt_bias.float())
            prev = self.deltas.get(i)
            self.deltas[i] = delta.reshape(-1, mixer.num_heads) if prev is None else torch.cat(
                [prev, delta.reshape(-1, mixer.num_heads)])
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


class RouterProbe:
    """Hooks every MoE router; recomputes the selection without the correction bias / without group limiting."""

    def __init__(self, model):
        self.handles = []
        self.stats = {}
        for i, layer in enumerate(model.model.layers):
            if type(layer.mixer).__name__ == "NemotronHMoE":
                self.handles.append(layer.mixer.gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def fn(gate, inp, out):
            x = inp[0].reshape(-1, gate.hidden_dim).float()
            _, w, idx = out
            scores = F.linear(x, gate.weight.float()).sigmoid()

            def select(s_choice, grouped):
                if grouped:
                    gs = s_choice.view(-1, gate.num_group, gate.num_experts // gate.num_group).topk(2, -1)[0].sum(-1)
                    gi = gs.topk(gate.topk_group, -1)[1]
                    gm = torch.zeros_like(gs).scatter_(1, gi, 1)
                    sm = gm.unsqueeze(-1).expand(-1, gate.num_group, gate.num_experts // gate.num_group).reshape(
                        -1, gate.num_experts)
                    s_choice = s_choice.masked_fill(~sm.bool(), float("-inf"))
                return set_rows(s_choice.topk(gate.top_k, -1)[1])

            def set_rows(ix):
                return [frozenset(r) for r in ix.tolist()]

            hf = set_rows(idx)
            mine = select(scores + gate.e_score_correction_bias, True)
            assert mine == hf, f"layer {i}: router re-computation disagrees with HF"
            no_bias = select(scores.clone(), True)
            no_group = select(scores + gate.e_score_correction_bias, False)
            n = len(hf)
            # margin between the k-th and (k+1)-th biased+masked score (robustness of the selection)
            s = scores + gate.e_score_correction_bias
            gs = s.view(-1, gate.num_group, gate.num_experts // gate.num_group).topk(2, -1)[0].sum(-1)
            top2g = gs.topk(2, -1)[0]
            group_margin = (top2g[:, 0] - top2g[:, 1]).min().item()
            # margin between the k-th and (k+1)-th expert inside the chosen group
            gi = gs.topk(gate.topk_group, -1)[1]
            gm = torch.zeros_like(gs).scatter_(1, gi, 1)
            sm = gm.unsqueeze(-1).expand(-1, gate.num_group, gate.num_experts // gate.num_group).reshape(
                -1, gate.num_experts)
            srt = s.masked_fill(~sm.bool(), float("-inf")).sort(-1, descending=True)[0]
            expert_margin = (srt[:, gate.top_k - 1] - srt[:, gate.top_k]).min().item()
            st = self.stats.setdefault(i, {"tokens": 0, "changed_by_bias": 0, "changed_by_group_limit": 0,
                                           "min_group_margin": float("inf"), "min_expert_margin": float("inf")})
            st["min_expert_margin"] = min(st["min_expert_margin"], expert_margin)
            st["tokens"] += n
            st["changed_by_bias"] += sum(a != b for a, b in zip(hf, no_bias))
            st["changed_by_group_limit"] += sum(a != b for a, b in zip(hf, no_group))
            st["min_group_margin"] = min(st["min_group_margin"], group_margin)
        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def check_layout_nemotron(keys: dict, cfg_dict: dict, pattern: str) -> None:
    assert all(k.startswith(("backbone.", "lm_head.")) for k in keys), "unexpected key prefix"
    assert "backbone.embeddings.weight" in keys and "backbone.norm_f.weight" in keys and "lm_head.weight" in keys
    for i, c in enumerate(pattern):
        pre = f"backbone.layers.{i}.mixer."
        assert f"backbone.layers.{i}.norm.weight" in keys
        if c == "E":
            for e in range(cfg_dict["n_routed_experts"]):
                assert f"{pre}experts.{e}.up_proj.weight" in keys, f"missing per-expert key in layer {i}"
                assert f"{pre}experts.{e}.down_proj.weight" in keys
            assert f"{pre}experts.up_proj" not in keys, "stacked expert tensor saved"
            assert f"{pre}gate.e_score_correction_bias" in keys
    assert all(dt == "F32" for _, dt in keys.values()), "non-fp32 tensor saved"


def rewrite_stacked_experts(path: Path) -> bool:
    """If a transformers version saved stacked experts, rewrite to the per-expert hub layout. Returns True if changed."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    changed = False
    out = {}
    for k, v in sd.items():
        if k.endswith((".experts.up_proj", ".experts.down_proj")) and v.dim() == 3:
            base, w = k.rsplit(".", 1)
            for e in range(v.shape[0]):
                out[f"{base}.{e}.{w}.weight"] = v[e].contiguous()
            changed = True
        else:
            out[k] = v
    if changed:
        save_file(out, str(path), metadata={"format": "pt"})
    return changed


def make_nemotron_h(name: str, pattern: str, seed: int, moe: bool, out_root: Path, hub_style_config: bool) -> None:
    print(f"== {name}  pattern {pattern}")
    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(NH_COMMON)
    if moe:
        kw.update(NH_MOE)
    cfg = NemotronHConfig(hybrid_override_pattern=pattern, **kw)
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg).float().eval()
    set_eager(model)
    init_nemotron_h(model, seed)

    tokens = torch.randint(0, cfg.vocab_size, (SEQ_LEN,), generator=gen(seed + 1))

    dprobe = MambaDtProbe(model)
    rprobe = RouterProbe(model) if moe else None
    logits = full_forward(model, tokens)
    dprobe.remove()
    if rprobe:
        rprobe.remove()

    # --- dt clamp trap check
    tmin = cfg.time_step_min
    dmin = min(d.min().item() for d in dprobe.deltas.values())
    dmax = max(d.max().item() for d in dprobe.deltas.values())
    for i, d in sorted(dprobe.deltas.items()):
        print(f"  layer {i} (M): Δ in [{d.min().item():.4f}, {d.max().item():.4f}]")
    if not dmin >= 10 * tmin:
        raise SystemExit(f"FATAL {name}: min Δ {dmin:.6g} < 10*time_step_min ({10 * tmin}); HF clamp would matter")
    print(f"  Δ check ok: min {dmin:.4f} >= 10*time_step_min = {10 * tmin}")

    routing = None
    if moe:
        routing = {str(k): v for k, v in sorted(rprobe.stats.items())}
        for i, st in sorted(rprobe.stats.items()):
            print(f"  layer {i} (E): tokens {st['tokens']}  selection changed by bias {st['changed_by_bias']}  "
                  f"by group limit {st['changed_by_group_limit']}  min margins: group {st['min_group_margin']:.4f} "
                  f"expert {st['min_expert_margin']:.4f}")
        tot_bias = sum(s["changed_by_bias"] for s in rprobe.stats.values())
        tot_group = sum(s["changed_by_group_limit"] for s in rprobe.stats.values())
        if tot_bias == 0 or tot_group == 0:
            raise SystemExit(f"FATAL {name}: bias ({tot_bias}) or group limit ({tot_group}) never changes routing")

    sanity = check_logits_sane(name, logits)
    d64 = fp64_diff(model, tokens, logits)

    # --- cache check
    cached = cached_forward(model, tokens, PREFILL_LEN)
    cache_diff = (cached - logits).abs().max().item()
    print(f"  prefill({PREFILL_LEN}) + {SEQ_LEN - PREFILL_LEN} cached decode steps vs full forward: max |Δ| {cache_diff:.3g}")
    if cache_diff > 1e-4:
        raise SystemExit(f"FATAL {name}: cached decode disagrees with full forward ({cache_diff})")

    # --- save
    for f in ("model.safetensors", "config.json"):
        if (folder / f).exists():
            (folder / f).unlink()
    model.save_pretrained(folder)
    for junk in ("generation_config.json",):
        if (folder / junk).exists():
            (folder / junk).unlink()
    if rewrite_stacked_experts(folder / "model.safetensors"):
        print("  NOTE: rewrote stacked experts to the per-expert hub layout")

    cfg_dict = json.loads((folder / "config.json").read_text())
    if hub_style_config:
        # NVIDIA hub form: legacy pattern string + num_hidden_layers, no layers_block_type, no MoE keys
        lbt = cfg_dict.pop("layers_block_type")
        assert NemotronHConfig._list_to_pattern(lbt) == pattern
        for k in MOE_ONLY_KEYS:
            cfg_dict.pop(k, None)
        cfg_dict.pop("time_step_limit", None)  # hub configs omit it (default (0, inf) = no clamp)
        new = {}
        for k, v in cfg_dict.items():
            new[k] = v
            if k == "hidden_size":
                new["hybrid_override_pattern"] = pattern
                new["num_hidden_layers"] = len(pattern)
        cfg_dict = new
        (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=False) + "\n")
    write_tokenizer(folder)

    keys = safetensors_keys(folder / "model.safetensors")
    check_layout_nemotron(keys, {**kw}, pattern)

    # --- reload check (also validates config.json)
    re = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    set_eager(re)
    assert NemotronHConfig._list_to_pattern(re.config.layers_block_type) == pattern
    if moe:
        for layer in re.model.layers:
            if type(layer.mixer).__name__ == "NemotronHMoE":
                assert layer.mixer.gate.e_score_correction_bias.abs().max() > 0, "bias lost on reload"
    relogits = full_forward(re, tokens)
    reload_diff = (relogits - logits).abs().max().item()
    print(f"  reload from folder: max |Δ| {reload_diff:.3g}")
    if reload_diff != 0.0:
        raise SystemExit(f"FATAL {name}: reloaded model gives different logits ({reload_diff})")

    write_reference(folder, tokens, logits)
    meta = {
        "fixture": name,
        "model_class": "NemotronHForCausalLM",
        "pattern": pattern,
        "seed": seed,
        "seq_len": SEQ_LEN,
        "reference": "full forward, no cache, fp32, CPU, HF torch fallback for Mamba2 (no mamba_ssm/causal_conv1d)",
        "implementations": impls(model),
        "versions": versions(),
        "checks": {
            "fp32_vs_fp64_max_abs_diff": d64,
            "mamba_delta_min": dmin,
            "mamba_delta_max": dmax,
            "time_step_min": tmin,
            "cache_prefill_len": PREFILL_LEN,
            "cache_vs_full_max_abs_diff": cache_diff,
            "reload_max_abs_diff": reload_diff,
            "routing": routing,
            "logits": sanity,
        },
    }
    (folder / "reference_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    report_folder(folder, keys)


# ----------------------------------------------------------------------------------------------
# Llama
# ----------------------------------------------------------------------------------------------

def init_llama(model: LlamaForCausalLM, seed: int) -> None:
    g = gen(seed)
    H = model.config.hidden_size
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            normal_(p, 0.3, g)  # tied: also the output head
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            uniform_(p, 0.7, 1.3, g)
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            normal_(p, 0.2, g)
        elif name.endswith(("v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            normal_(p, 1.0 / math.sqrt(H), g)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            normal_(p, 1.0 / math.sqrt(p.shape[1]), g)
        else:
            raise RuntimeError(f"no init rule for {name}")


def make_llama(name: str, seed: int, out_root: Path) -> None:
    print(f"== {name}")
    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, num_hidden_layers=3, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5, max_position_embeddings=256, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    set_eager(model)
    init_llama(model, seed)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    tokens = torch.randint(0, cfg.vocab_size, (SEQ_LEN,), generator=gen(seed + 1))
    logits = full_forward(model, tokens)
    sanity = check_logits_sane(name, logits)
    d64 = fp64_diff(model, tokens, logits)
    cached = cached_forward(model, tokens, PREFILL_LEN)
    cache_diff = (cached - logits).abs().max().item()
    print(f"  prefill({PREFILL_LEN}) + {SEQ_LEN - PREFILL_LEN} cached decode steps vs full forward: max |Δ| {cache_diff:.3g}")
    if cache_diff > 1e-4:
        raise SystemExit(f"FATAL {name}: cached decode disagrees with full forward ({cache_diff})")
    for f in ("model.safetensors", "config.json"):
        if (folder / f).exists():
            (folder / f).unlink()
    model.save_pretrained(folder)
    if (folder / "generation_config.json").exists():
        (folder / "generation_config.json").unlink()
    write_tokenizer(folder)
    keys = safetensors_keys(folder / "model.safetensors")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    re = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    set_eager(re)
    reload_diff = (full_forward(re, tokens) - logits).abs().max().item()
    print(f"  reload from folder: max |Δ| {reload_diff:.3g}")
    if reload_diff != 0.0:
        raise SystemExit(f"FATAL {name}: reloaded model gives different logits ({reload_diff})")
    write_reference(folder, tokens, logits)
    meta = {
        "fixture": name,
        "model_class": "LlamaForCausalLM",
        "seed": seed,
        "seq_len": SEQ_LEN,
        "reference": "full forward, no cache, fp32, CPU",
        "implementations": impls(model),
        "versions": versions(),
        "checks": {
            "fp32_vs_fp64_max_abs_diff": d64,
            "cache_prefill_len": PREFILL_LEN,
            "cache_vs_full_max_abs_diff": cache_diff,
            "reload_max_abs_diff": reload_diff,
            "logits": sanity,
        },
    }
    (folder / "reference_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    report_folder(folder, keys)


def report_folder(folder: Path, keys: dict) -> None:
    print(f"  {len(keys)} tensors, {sum(int(np.prod(s)) for s, _ in keys.values())} params")
    for p in sorted(folder.iterdir()):
        if p.is_file():
            print(f"    {p.name:24s} {p.stat().st_size:>9d} B")
    print(f"  folder total {dir_size(folder) / 1024:.1f} KiB")


FIXTURES = {
    "nemotron_h_dense": lambda out: make_nemotron_h("nemotron_h_dense", "M*-M-*M-", 1234, False, out, True),
    "nemotron_h_moe": lambda out: make_nemotron_h("nemotron_h_moe", "MEM*EMEE", 4321, True, out, False),
    "llama_tiny": lambda out: make_llama("llama_tiny", 777, out),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--only", nargs="*", choices=sorted(FIXTURES), default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    for name in args.only or list(FIXTURES):
        FIXTURES[name](args.out)
    print("all fixtures written and checked")


if __name__ == "__main__":
    sys.exit(main())
