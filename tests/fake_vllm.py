"""A stand-in for TRL's vLLM engine (no GPU): it drives TRL's real vLLM code path on the CPU."""

import torch
from trl.generation.vllm_generation import VLLMGeneration

from trl_alp.rollout import record_generate_logprobs

SHIFT = 1.0  # by default the fake engine reports log μ = log π − SHIFT, so the token ratio π/μ is exactly e


class FakeVLLM:
    """Samples with the training model and reports its log-probs minus `shift`, plus seeded Gaussian `noise` per token,
    in vLLM's output format."""

    instances: list = []
    shift: float = SHIFT
    noise: float = 0.0
    ragged: bool = False  # cut completions to seeded random lengths (as EOS would), so TRL pads the batch
    _iter_named_params = VLLMGeneration._iter_named_params
    _fix_param_name_to_vllm = VLLMGeneration._fix_param_name_to_vllm

    def __init__(self, model, accelerator, processing_class, **kwargs):
        from trl.distributed import DistributedBackend

        self.model, self.accelerator, self.tokenizer = model, accelerator, processing_class
        self.temperature, self.max_completion_length = kwargs["temperature"], kwargs["max_completion_length"]
        self._dist = DistributedBackend(accelerator)
        self.synced: list[list[str]] = []
        self._noise = torch.Generator().manual_seed(0)
        FakeVLLM.instances.append(self)

    def sync_weights(self):
        self.synced.append([name for name, _ in self._iter_named_params()])

    def generate(self, prompts, images, num_generations, profiler=None):
        model = self.accelerator.unwrap_model(self.model)
        pad = self.tokenizer.pad_token_id
        completion_ids, logprobs = [], []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with torch.no_grad(), record_generate_logprobs(model, self.temperature) as recorder:
                out = model.generate(
                    ids,
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    max_new_tokens=self.max_completion_length,
                    pad_token_id=pad,
                )
            new = out[0, ids.size(1) :].tolist()
            keep = int(torch.randint(2, len(new) + 1, (1,), generator=self._noise)) if self.ragged else len(new)
            new = new[:keep]
            completion_ids.append(new)
            reported = recorder.results[-1][0, :keep].double() - self.shift
            if self.noise:
                reported = reported + self.noise * torch.randn(
                    reported.shape, generator=self._noise, dtype=torch.float64
                )
            logprobs.append([[lp] for lp in reported.tolist()])
        return prompts, completion_ids, logprobs, None
