"""A model's sampling defaults: where they are read from, and that the offline API, the CLI and
the server all fill the fields a caller leaves unset from them."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from orcinus.config import ConfigError, EngineConfig
from orcinus.engine.async_engine import AsyncEngine
from orcinus.engine.llm import LLM
from orcinus.generation_config import GenerationConfigError, load_generation_defaults
from orcinus.models.gguf_loader import read_gguf_metadata
from orcinus.models.loader import default_model_path
from orcinus.sampling_params import SamplingParams
from orcinus.server.app import create_app
from orcinus.server.protocol import ChatCompletionRequest
from orcinus.server.settings import ServerSettings

PROMPT = {"prompt_token_ids": [5, 6, 7, 8]}


def _write(folder, data: dict) -> str:
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(data, f)
    return str(folder)


# -- reading ----------------------------------------------------------------------------------


def test_generation_config_json_fields_map_to_sampling_params(tmp_path) -> None:
    _write(tmp_path, {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                      "max_new_tokens": 7, "do_sample": True, "eos_token_id": 2, "bos_token_id": 1})
    d = load_generation_defaults("auto", str(tmp_path))
    assert dict(d.values) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                              "repetition_penalty": 1.1, "max_tokens": 7}
    assert str(tmp_path) in d.source


def test_do_sample_false_means_greedy(tmp_path) -> None:
    _write(tmp_path, {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "max_new_tokens": 9})
    assert dict(load_generation_defaults("auto", str(tmp_path)).values) == {"temperature": 0.0, "max_tokens": 9}


def test_a_gguf_file_reads_the_json_beside_it_then_its_sampling_metadata(tmp_path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"")
    meta = {"general.sampling.temp": 0.3, "general.sampling.top_k": 40, "general.sampling.penalty_repeat": 1.05}
    assert dict(load_generation_defaults("auto", str(gguf), gguf_metadata=meta).values) == \
        {"temperature": 0.3, "top_k": 40, "repetition_penalty": 1.05}
    _write(tmp_path, {"temperature": 0.9})
    assert dict(load_generation_defaults("auto", str(gguf), gguf_metadata=meta).values) == {"temperature": 0.9}


def test_the_default_model_takes_its_model_cards_settings() -> None:
    path = default_model_path()
    d = load_generation_defaults("auto", path, gguf_metadata=read_gguf_metadata(path))
    assert dict(d.values) == {"temperature": 0.2, "top_p": 0.9}
    assert "model card" in d.source


def test_vllm_mode_a_folder_and_overrides(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "other").mkdir()
    model = _write(tmp_path / "model", {"temperature": 0.5})
    other = _write(tmp_path / "other", {"top_p": 0.5})
    assert dict(load_generation_defaults("vllm", model).values) == {}
    assert dict(load_generation_defaults(str(other), model).values) == {"top_p": 0.5}
    d = load_generation_defaults("auto", model, '{"max_new_tokens": 3, "top_k": 5}')
    assert dict(d.values) == {"temperature": 0.5, "max_tokens": 3, "top_k": 5}
    assert "override" in d.source
    assert dict(load_generation_defaults("vllm", model, {"temperature": 0}).values) == {"temperature": 0}


@pytest.mark.parametrize("mode, override, says", [
    ("auto", '{"temprature": 0.5}', "unknown keys ['temprature']"),
    ("auto", "{not json", "not valid JSON"),
    ("auto", "[1, 2]", "JSON object"),
    ("auto", '{"temperature": -1}', "temperature must be non-negative"),
    ("missing-folder", None, "no generation_config.json"),
])
def test_bad_generation_configs_say_what_to_change(tmp_path, mode, override, says) -> None:
    model = _write(tmp_path, {})
    with pytest.raises(GenerationConfigError) as info:
        load_generation_defaults(mode if mode != "missing-folder" else str(tmp_path / "nowhere"), model, override)
    assert says in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_engine_config_refuses_a_bad_override_before_loading_anything() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        EngineConfig(override_generation_config='{"temp": 1}')


# -- use: offline API, start-up log, server ---------------------------------------------------


@pytest.fixture(scope="module")
def model_with_defaults(checkpoint_factory, tmp_path_factory) -> str:
    """The tiny checkpoint, with a generation_config.json: greedy, 3 new tokens."""
    folder, _ = checkpoint_factory("llama")
    copy = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(folder, copy)
    return _write(copy, {"temperature": 0.0, "max_new_tokens": 3})


def _llm(model: str, **kwargs) -> LLM:
    return LLM(model, skip_tokenizer_init=True, dtype="float32", kv_cache_memory=1 << 22, block_size=4, **kwargs)


def test_generate_without_params_uses_the_models_defaults_and_logs_them(model_with_defaults, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="orcinus.engine.llm_engine"):
        llm = _llm(model_with_defaults)
    assert "sampling defaults" in caplog.text and "max_tokens=3" in caplog.text and "temperature=0.0" in caplog.text
    out = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 and out.token_ids == greedy.token_ids
    assert llm.get_default_sampling_params().max_tokens == 3
    longer = _llm(model_with_defaults, override_generation_config={"max_new_tokens": 5})
    assert len(longer.generate(PROMPT, use_tqdm=False)[0].outputs[0].token_ids) == 5
    engine_own = _llm(model_with_defaults, generation_config="vllm")
    assert engine_own.get_default_sampling_params() == SamplingParams()


def test_server_fills_unset_fields_from_the_models_defaults(model_with_defaults) -> None:
    llm = _llm(model_with_defaults, override_generation_config={"max_new_tokens": 4})
    app = create_app(AsyncEngine(llm.engine, stall_timeout_s=5), ServerSettings(served_model_names=["tiny"]))
    with TestClient(app) as client:
        def completion(**fields) -> dict:
            resp = client.post("/v1/completions", json={"prompt": PROMPT["prompt_token_ids"], "ignore_eos": True,
                                                        **fields})
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]

        unset = completion()
        assert unset["finish_reason"] == "length"
        greedy = completion(temperature=0, max_tokens=4)
        assert unset["text"] == greedy["text"]  # temperature 0 came from the model's defaults
        tokens = client.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "ignore_eos": True}).json()
        assert tokens["usage"]["completion_tokens"] == 4  # the model's max_new_tokens, not OpenAI's 16
        assert client.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "ignore_eos": True,
                                                    "max_tokens": 2}).json()["usage"]["completion_tokens"] == 2


def test_chat_request_fields_left_out_or_null_take_the_defaults() -> None:
    messages = [{"role": "user", "content": "hi"}]
    defaults = {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    unset = ChatCompletionRequest(messages=messages).sampling_params(None, None, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.2, 0.9, 20, 1.1)
    null = ChatCompletionRequest(messages=messages, temperature=None).sampling_params(None, None, defaults)
    assert null.temperature == 0.2
    given = ChatCompletionRequest(messages=messages, temperature=0.0, top_k=-1).sampling_params(None, None, defaults)
    assert (given.temperature, given.top_k, given.top_p) == (0.0, -1, 0.9)
    assert ChatCompletionRequest(messages=messages).sampling_params(None, None).temperature == 1.0


def test_help_shows_the_default_models_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "orcinus", "generate", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "--generation-config" in out and "--override-generation-config" in out
    assert "temperature 0.2, top_p 0.9" in " ".join(out.split())
