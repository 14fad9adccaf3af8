"""A Nemotron-H config.json exactly as transformers' own `save_pretrained` writes it: every value is
NemotronHConfig's default except the sizes, which are those of tests/fixtures/nemotron_h_dense (so its
weights load with it). Writes tests/fixtures/python_config/:

  config.json       save_pretrained of transformers 5: "time_step_limit": [0.0, {"__float__": "Infinity"}]
  config_json.json  the same dict as transformers 4 wrote it (PretrainedConfig.to_json_string was
                    json.dumps(d, indent=2, sort_keys=True)), and as NVIDIA's hub configs carry it:
                    bare Infinity. transformers 4 has no NemotronHConfig (it came with the hub's remote
                    code); its only config class with an infinite default is Mamba2Config.

Usage: .venv-ref/bin/python tools/ref/gen_python_config.py   (needs only `pip install transformers`, no torch)
"""
import json
import pathlib

from transformers import NemotronHConfig

root = pathlib.Path(__file__).resolve().parents[2]
out = root / "tests/fixtures/python_config"
kinds = {"M": "mamba", "*": "attention", "-": "mlp"}
cfg = NemotronHConfig(
    vocab_size=256, hidden_size=64, layers_block_type=[kinds[c] for c in "M*-M-*M-"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
    ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
)
cfg.save_pretrained(out)
text = (out / "config.json").read_text()
assert '"__float__": "Infinity"' in text, "transformers no longer tags inf"
d = json.loads(text)
d["time_step_limit"] = list(cfg.time_step_limit)
(out / "config_json.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
assert "Infinity\n" in (out / "config_json.json").read_text()
print(out, sorted(p.name for p in out.iterdir()))
