"""`orcinus bench random-checkpoint`: a real architecture's shapes with random weights, which
orcinus and transformers both load and agree on."""
from __future__ import annotations

import json

import pytest
import torch

from orcinus import LLM, SamplingParams
from orcinus.bench.random_checkpoint import PRESETS
from orcinus.cli import main
from references import hf_generate_greedy

SMALL = ["num_hidden_layers=2", "hidden_size=64", "intermediate_size=128", "vocab_size=512", "head_dim=16",
         "num_attention_heads=4", "num_key_value_heads=2"]


def test_scaled_down_qwen3_keeps_the_preset_and_matches_transformers(tmp_path, capsys):
    folder = tmp_path / "qwen3"
    argv = ["bench", "random-checkpoint", "qwen3-0.6b", str(folder), "--dtype", "float32"]
    for item in SMALL:
        argv += ["--override", item]
    assert main(argv) == 0
    assert "random weights" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["num_hidden_layers"] == 2
    # fields not overridden keep the published model's values
    preset = PRESETS["qwen3-0.6b"][1]
    assert config["tie_word_embeddings"] is preset["tie_word_embeddings"]
    assert config["max_position_embeddings"] == preset["max_position_embeddings"]
    assert preset["rope_theta"] in (config.get("rope_theta"), config.get("rope_parameters", {}).get("rope_theta"))

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 99, 3, 250, 7]
    llm = LLM(str(folder), skip_tokenizer_init=True, dtype="float32")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_generate_greedy(hf, prompt, 8)


def test_an_override_naming_no_config_field_is_a_usage_error(tmp_path, capsys):
    argv = ["bench", "random-checkpoint", "llama-3-8b", str(tmp_path / "x"), "--override", "num_layerz=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "num_layerz" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("item", ["num_hidden_layers", "=3"])
def test_an_override_without_key_and_value_is_a_usage_error(tmp_path, capsys, item):
    assert main(["bench", "random-checkpoint", "smollm2-135m", str(tmp_path / "y"), "--override", item]) == 2
    assert "key=value" in capsys.readouterr().err
