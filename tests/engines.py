"""Test helpers: a stand-in vLLM engine (any log-prob shift) and scripted turns for tool-calling tests."""

from __future__ import annotations

import types

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from trl.generation.vllm_generation import VLLMGeneration
from trl.models.utils import disable_gradient_checkpointing

from trl_alp.rollout import record_generate_logprobs


class StandInVLLM:
    """Samples with the training model and reports its log-probs minus `shift`, plus seeded Gaussian `noise` per token,
    in vLLM's output format; `ragged` cuts completions to seeded random lengths (as EOS would), so TRL pads the batch.
    `synced` records the parameter names TRL's real weight-sync iterator would send."""

    shift = 0.0
    noise = 0.0
    ragged = False
    instances: list = []
    _iter_named_params = VLLMGeneration._iter_named_params
    _fix_param_name_to_vllm = VLLMGeneration._fix_param_name_to_vllm

    def __init__(self, model, accelerator, processing_class, **kwargs):
        from trl.distributed import DistributedBackend

        self.model, self.accelerator, self.tokenizer = model, accelerator, processing_class
        self.temperature, self.max_completion_length = kwargs["temperature"], kwargs["max_completion_length"]
        self._dist = DistributedBackend(accelerator)  # used by the weight-sync iterator
        unwrapped = accelerator.unwrap_model(model)
        # TRL's tool loop reads the engine's context length in colocate mode
        config = types.SimpleNamespace(max_model_len=unwrapped.config.max_position_embeddings)
        self.llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(model_config=config))
        self.synced: list[list[str]] = []
        self._random = torch.Generator().manual_seed(0)
        StandInVLLM.instances.append(self)

    def sync_weights(self):
        self.synced.append([name for name, _ in self._iter_named_params()])

    def generate(self, prompts, images, num_generations, profiler=None):
        model = self.accelerator.unwrap_model(self.model)
        completion_ids, logprobs = [], []
        for prompt in prompts:  # colocate mode: the prompts already hold each prompt's num_generations copies
            ids = torch.tensor([prompt])
            # as TRL's generate path: with checkpointing on in train mode, transformers 5.17 drops the KV cache
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(model),
                record_generate_logprobs(model, self.temperature) as recorder,
            ):
                out = model.generate(
                    ids,
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    max_new_tokens=self.max_completion_length,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = out[0, ids.size(1) :].tolist()
            low = min(2, len(new))  # a completion that ended at its first token stays one token long
            keep = int(torch.randint(low, len(new) + 1, (1,), generator=self._random)) if self.ragged else len(new)
            reported = recorder.results[-1][0, :keep].double() - self.shift
            if self.noise:
                reported = reported + self.noise * torch.randn(
                    reported.shape, generator=self._random, dtype=torch.float64
                )
            completion_ids.append(new[:keep])
            logprobs.append([[lp] for lp in reported.tolist()])
        return prompts, completion_ids, logprobs, None


class ScriptedTurns(LogitsProcessor):
    """Forces a turn to emit `script` then EOS: every turn (``mode="always"``) or only a conversation's first turn
    (``"first"``: the prompt does not contain the script yet); other rows sample freely.

    It runs after the log-prob recorder, so the recorded value is the model's own log-prob of the forced token.
    """

    def __init__(self, script: list[int], eos_token_id: int, mode: str = "first"):
        self.script, self.eos, self.mode = script, eos_token_id, mode
        self.start: int | None = None
        self.forced: list[bool] = []

    def _contains_script(self, row: list[int]) -> bool:
        n = len(self.script)
        return any(row[i : i + n] == self.script for i in range(len(row) - n + 1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.size(1)
            self.forced = [self.mode == "always" or not self._contains_script(r) for r in input_ids.tolist()]
        step = input_ids.size(1) - self.start
        token = self.script[step] if step < len(self.script) else self.eos
        for row, forced in enumerate(self.forced):
            if forced:
                scores[row] = -float("inf")
                scores[row, token] = 0.0
        return scores


def script_generation(model, script: list[int], eos_token_id: int, mode: str = "first") -> None:
    """Make every ``model.generate`` call run a fresh `ScriptedTurns` after the caller's logits processors."""
    original = model.generate

    def generate(*args, logits_processor=None, **kwargs):
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(ScriptedTurns(script, eos_token_id, mode))
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
