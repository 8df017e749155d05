"""Settings shared by the in-process tests (conftest.py) and the multi-process worker: one tiny GRPO setup."""

PROMPT_ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}]} for a in range(6) for b in range(6)]

TRAINER_SETTINGS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    learning_rate=1e-2,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    bf16=False,
    use_cpu=True,
    seed=0,
)

# The real-vLLM tests' tiny model (conftest.py's `vllm_model_dir`): vLLM's CPU attention refuses head_dim 16 (the other
# tests' tiny model), hidden 256 over 4 heads gives 64.
VLLM_HIDDEN = 256


def length_reward(completions, **kwargs):
    """A cheap reward with spread inside each group, so advantages are non-zero."""
    return [float(len(c[0]["content"]) % 5) for c in completions]


def last_logged(trainer, key):
    """The last value of `key` in a trainer's log history (fails if it was never logged)."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    assert values, f"{key} was never logged"
    return values[-1]


def count_no_grad_logprob_passes(trainer) -> list:
    """Record, in the returned list, every no-grad log-prob pass of `trainer` that computed something (TRL's old or
    reference pass; ALP skips the old one by returning None)."""
    import torch

    passes = []
    original = type(trainer)._get_per_token_logps_and_entropies

    def counting(self, model, *args, **kwargs):
        out = original(self, model, *args, **kwargs)
        if out[0] is not None and not torch.is_grad_enabled():
            passes.append(1)
        return out

    trainer._get_per_token_logps_and_entropies = counting.__get__(trainer)
    return passes


def capture_loss_inputs(trainer) -> list[dict]:
    """Record the batches `trainer._compute_loss` receives (the list fills as the trainer trains)."""
    seen, original = [], trainer._compute_loss

    def compute_loss(model, inputs):
        seen.append(inputs)
        return original(model, inputs)

    trainer._compute_loss = compute_loss
    return seen


def alp_log(caplog) -> str:
    """What trl_alp itself logged. Only its own records: once a vLLM engine ran in this test process, torch.distributed
    stays initialised and transformers warns about it on every config, whichever test comes next."""
    return "".join(f"{record.getMessage()}\n" for record in caplog.records if record.name.startswith("trl_alp"))
