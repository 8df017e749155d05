"""Tiny offline models and a byte-level BPE tokenizer, built in code.

Used by the tests, the `--model tiny` demo and the notebooks' smoke mode: nothing here touches the network.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

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

    from .data import calculator

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
