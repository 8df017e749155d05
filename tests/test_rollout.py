"""Sampled-token log-probs captured during `generate` equal a careful fp32 recomputation."""

import pytest
import torch

from trl_alp.experiments.models import build_tiny_model
from trl_alp.rollout import SampledLogprobRecorder, record_generate_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_captured_logprobs_match_fp32_recomputation(tokenizer, temperature):
    model = build_tiny_model(tokenizer).eval()
    prompt = torch.tensor([[5, 17, 42, 9]])
    torch.manual_seed(1)
    with torch.no_grad(), record_generate_logprobs(model, temperature) as recorder:
        # No eos: min_new_tokens would mask it before the recorder and change the distribution on purpose.
        sequences = model.generate(
            prompt, do_sample=True, temperature=temperature, top_k=0, max_new_tokens=7, eos_token_id=None
        )
    assert "generate" not in vars(model)  # the patch is gone
    captured = recorder.results[-1]
    new_tokens = sequences[:, prompt.size(1) :]
    assert captured.shape == new_tokens.shape == (1, 7)
    with torch.no_grad():
        logits = model(sequences).logits.double()[:, prompt.size(1) - 1 : -1] / temperature
    expected = torch.log_softmax(logits, -1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(captured.double(), expected, atol=1e-5, rtol=1e-5)


def test_recorder_keeps_one_vocab_row_per_sequence():
    recorder = SampledLogprobRecorder(temperature=2.0)
    scores = torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    recorder(torch.tensor([[0], [0]]), scores)
    recorder(torch.tensor([[0, 2], [0, 1]]), scores)  # tokens 2 and 1 were sampled from the first scores
    out = recorder.finish(torch.tensor([[0, 2, 1], [0, 1, 0]]))
    expected_first = torch.log_softmax(scores / 2.0, -1)[[0, 1], [2, 1]]
    expected_last = torch.log_softmax(scores / 2.0, -1)[[0, 1], [1, 0]]
    torch.testing.assert_close(out, torch.stack([expected_first, expected_last], 1))
    assert recorder._pending is None and recorder._steps == []


def test_recorder_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SampledLogprobRecorder(0.0)


def test_recorder_is_unaffected_by_processors_that_modify_scores_in_place():
    recorder = SampledLogprobRecorder()
    scores = torch.randn(2, 5)
    expected = torch.log_softmax(scores, dim=-1)[:, 1]
    recorder(torch.tensor([[0], [0]]), scores)
    scores[:, 0] = -float("inf")  # a later processor forcing tokens, in place
    recorder(torch.tensor([[0, 1], [0, 1]]), torch.randn(2, 5))
    torch.testing.assert_close(recorder._steps[0], expected)
