#!/usr/bin/env python3
"""Convert a tiny Nemotron-H fixture to GGUF with llama.cpp's own converter, working around its pitfalls.

Usage (reference venv, llama.cpp tree from scripts/build-llama-cpp.sh):
    .venv-ref/bin/python tools/ref/convert_gguf.py tests/fixtures/nemotron_h_dense \
        --outfile tests/fixtures/nemotron_h_dense/model-f32.gguf --outtype f32
    [--llama-cpp DIR]   (default .cache/llama.cpp; also env LLAMA_CPP_DIR)
All other arguments are passed to convert_hf_to_gguf.py unchanged.

Monkeypatches (only inside this process; the vendored tree is not modified):
 1. ModelBase.load_hparams reads config.json verbatim instead of AutoConfig(...).to_dict()
    (transformers 5 fills in MoE defaults, so every NemotronH would convert as nemotron_h_moe).
    The config is then normalised for the converter:
      - a `layers_block_type` list is turned into the legacy `hybrid_override_pattern` string
        (the converter counts only "moe" as an FFN layer in list form, so dense "mlp" layers
        would become SSM layers);
      - `num_hidden_layers` = len(pattern);
      - the MoE keys are dropped when the pattern has no `E` (the converter picks
        nemotron_h_moe whenever `num_experts_per_tok` is present).
 2. TextModel.get_vocab_base_pre: the fixtures' 256-byte tokenizer has no known pre-tokenizer hash;
    unknown hashes map to "gpt-2" (byte-level, GPT-2 regex) instead of raising.
 3. gguf.SpecialVocab.add_to_gguf: llama.cpp refuses a "gpt2" tokenizer without a
    tokenizer.ggml.merges array, and the fixture tokenizer has no merges (a merge needs its result in
    the 256-entry vocab). One inert merge "一 一" is written instead: its symbols are outside the
    byte-level alphabet, so it can never fire and every byte still maps to its own token.
 4. NemotronHModel.set_gguf_parameters also writes `expert_group_used_count` (= topk_group) when
    n_group > 1; the converter writes only `expert_group_count`, and llama.cpp then asserts
    n_group_used > 0 when loading a model with group-limited routing.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pop_opt(argv: list[str], flag: str) -> str | None:
    if flag in argv:
        i = argv.index(flag)
        val = argv[i + 1]
        del argv[i : i + 2]
        return val
    return None


def main() -> None:
    argv = sys.argv[1:]
    lcpp = Path(_pop_opt(argv, "--llama-cpp") or os.environ.get("LLAMA_CPP_DIR") or REPO / ".cache" / "llama.cpp")
    lcpp = lcpp.resolve()
    if not (lcpp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"convert_gguf: {lcpp}/convert_hf_to_gguf.py not found (run scripts/build-llama-cpp.sh)")
    # use the vendored converter and its own gguf-py (as convert_hf_to_gguf.py itself does)
    sys.path.insert(0, str(lcpp / "gguf-py"))
    sys.path.insert(0, str(lcpp))
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    import torch

    torch.set_num_threads(2)

    import convert_hf_to_gguf as conv
    from conversion import base as cbase
    from conversion import nemotron as cnem

    ModelBase, TextModel = cbase.ModelBase, cbase.TextModel
    orig_load = ModelBase.load_hparams

    moe_keys = [
        "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
        "n_shared_experts", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "moe_latent_size",
        "moe_shared_expert_overlap", "num_local_experts",
    ]
    legacy = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-", "moe": "E"}

    def load_hparams(dir_model: Path, is_mistral_format: bool):
        cfg_path = Path(dir_model) / "config.json"
        if is_mistral_format or not cfg_path.is_file():
            return orig_load(dir_model, is_mistral_format)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("model_type") == "nemotron_h":
            pattern = cfg.get("hybrid_override_pattern")
            lbt = cfg.pop("layers_block_type", None)
            if pattern is None and lbt is not None:
                pattern = "".join(legacy[t] for t in lbt)
            if pattern is None:
                raise SystemExit("convert_gguf: nemotron_h config without hybrid_override_pattern/layers_block_type")
            cfg["hybrid_override_pattern"] = pattern
            cfg["num_hidden_layers"] = len(pattern)
            if "E" not in pattern:
                for k in moe_keys:
                    cfg.pop(k, None)
            elif "-" in pattern:
                raise SystemExit("convert_gguf: llama.cpp cannot represent both '-' and 'E' layers in one model")
            cfg.pop("mtp_layers_block_type", None)
        return cfg

    ModelBase.load_hparams = staticmethod(load_hparams)

    orig_pre = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return orig_pre(self, tokenizer)
        except NotImplementedError:
            cbase.logger.warning("convert_gguf: unknown pre-tokenizer hash, using 'gpt-2' (byte-level fixture tokenizer)")
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre

    import gguf

    orig_add = gguf.SpecialVocab.add_to_gguf

    def add_to_gguf(self, gw, quiet: bool = False):
        if self.load_merges and not self.merges:
            cbase.logger.warning("convert_gguf: tokenizer has no merges; writing one inert merge for llama.cpp")
            self.merges = ["\u4e00 \u4e00"]
        return orig_add(self, gw, quiet=quiet)

    gguf.SpecialVocab.add_to_gguf = add_to_gguf

    orig_params = cnem.NemotronHModel.set_gguf_parameters

    def set_gguf_parameters(self):
        orig_params(self)
        if self.is_moe and int(self.hparams.get("n_group", 1) or 1) > 1:
            self.gguf_writer.add_expert_group_used_count(int(self.hparams["topk_group"]))

    cnem.NemotronHModel.set_gguf_parameters = set_gguf_parameters

    sys.argv = [str(lcpp / "convert_hf_to_gguf.py"), *argv]
    conv.main()


if __name__ == "__main__":
    main()
