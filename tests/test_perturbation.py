"""Layer discovery, layer selection, seeded noise and the hooks, on tiny models of every supported architecture."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import trl_alp.perturbation as perturbation_module
from trl_alp.experiments.models import TINY_CONFIGS, build_tiny_model
from trl_alp.perturbation import (
    LayerPerturbation,
    NoiseStash,
    add_seeded_noise,
    find_decoder_layers,
    hidden_rms,
    noise_seed,
    parse_layer_spec,
    seeded_noise,
    validate_layer_spec,
)

EXPECTED_PATHS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}


class DDPLike(nn.Module):
    """Stands in for DistributedDataParallel / DeepSpeed engines, which expose the model as `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_layers_found_and_perturbed_on_every_architecture(tokenizer, model_type):
    assert set(EXPECTED_PATHS) == set(TINY_CONFIGS)
    model = build_tiny_model(tokenizer, model_type, num_layers=3).eval()
    path, layers = find_decoder_layers(DDPLike(model))
    assert path == EXPECTED_PATHS[model_type]
    assert len(layers) == 3
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    clean = model(ids).logits
    perturbation = LayerPerturbation(layers, [0, 2], init_sigma=0.5)
    with perturbation.active(step=0, micro_step=0):
        noisy = model(ids).logits
    assert perturbation.applied == [1, 1]  # once per selected layer
    assert not torch.allclose(clean, noisy)
    torch.testing.assert_close(model(ids).logits, clean)  # hooks removed: back to the base model


def test_layers_found_under_peft(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(tokenizer, "llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    path, layers = find_decoder_layers(DDPLike(model))
    assert path == "model.layers"
    assert layers is model.get_base_model().model.layers


def test_missing_layers_error_names_paths_and_field():
    with pytest.raises(ValueError, match=r"model\.layers.*transformer\.h.*alp_layers_path"):
        find_decoder_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="alp_layers_path='blocks'"):
        find_decoder_layers(nn.Linear(2, 2), path="blocks")


def test_explicit_layers_path(tokenizer):
    model = build_tiny_model(tokenizer, "qwen2")
    path, layers = find_decoder_layers(model, "model.layers")
    assert path == "model.layers" and layers is model.model.layers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(9))),
        (None, list(range(9))),
        ("none", []),
        ("0-5", [0, 1, 2, 3, 4, 5]),
        ("3", [3]),
        ("0-1, 7", [0, 1, 7]),
        ([4, 2, 2], [2, 4]),
        ("early", [0, 1, 2]),
        ("middle", [3, 4, 5]),
        ("late", [6, 7, 8]),
    ],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 9) == expected


def test_layer_groups_keep_at_least_one_layer():
    assert parse_layer_spec("early", 2) == [0] and parse_layer_spec("late", 2) == [1]
    assert parse_layer_spec("middle", 1) == [0]


@pytest.mark.parametrize("spec", ["0-", "a", "5-2", "1;2", [1.5]])
def test_malformed_layer_specs(spec):
    with pytest.raises(ValueError, match="alp_layers"):
        validate_layer_spec(spec)


def test_out_of_range_layers():
    with pytest.raises(ValueError, match=r"selects layers \[9\].*0\.\.8"):
        parse_layer_spec("7-9", 9)


def test_noise_is_reproducible_and_distinct_per_coordinate():
    shape = torch.Size([2, 3, 4])
    a = seeded_noise(shape, noise_seed(0, 1, 2, 3, 0), torch.device("cpu"))
    torch.testing.assert_close(a, seeded_noise(shape, noise_seed(0, 1, 2, 3, 0), torch.device("cpu")))
    seeds = {noise_seed(0, 1, 2, 3, 0), noise_seed(0, 2, 2, 3, 0), noise_seed(0, 1, 3, 3, 0)}
    seeds |= {noise_seed(0, 1, 2, 4, 0), noise_seed(0, 1, 2, 3, 1), noise_seed(1, 1, 2, 3, 0)}
    assert len(seeds) == 6  # step, micro step, layer, rank and seed all change the noise
    assert a.std().item() == pytest.approx(1.0, abs=0.5)


def test_sigma_gradient_equals_the_stored_noise_formulation():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(8, 8)
    log_sigma = torch.tensor([-1.0], requires_grad=True)
    seed = noise_seed(3, 1, 0, 2, 0)

    out = add_seeded_noise(hidden, log_sigma.exp(), seed)
    (out @ weight).pow(2).sum().backward()
    grads = hidden.grad.clone(), log_sigma.grad.clone()

    hidden.grad, log_sigma.grad = None, None
    eps = seeded_noise(hidden.shape, seed, hidden.device)  # the plain formulation stores ε
    ((hidden + log_sigma.exp() * eps) @ weight).pow(2).sum().backward()
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], log_sigma.grad)
    assert grads[1].abs().item() > 0


def test_hooks_skip_no_grad_and_suspended_forwards(tokenizer):
    model = build_tiny_model(tokenizer)
    _, layers = find_decoder_layers(model)
    perturbation = LayerPerturbation(layers, [0, 1], init_sigma=1.0)
    ids = torch.tensor([[5, 6, 7]])
    clean = model(ids).logits.detach()
    with perturbation.active(0, 0):
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, clean)
        with perturbation.suspended():
            torch.testing.assert_close(model(ids).logits.detach(), clean)
        assert perturbation.applied == [0, 0]
        model(ids)
        assert perturbation.applied == [1, 1]


def test_hooks_removed_when_the_step_raises(tokenizer):
    model = build_tiny_model(tokenizer)
    _, layers = find_decoder_layers(model)
    perturbation = LayerPerturbation(layers, [0, 1])
    with pytest.raises(KeyboardInterrupt), perturbation.active(0, 0):
        assert all(len(layer._forward_pre_hooks) == 1 for layer in layers)
        raise KeyboardInterrupt
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    assert not perturbation.is_active


def test_sigma_zero_gives_the_unperturbed_numerator_and_sigma_positive_differs(tokenizer):
    model = build_tiny_model(tokenizer)
    _, layers = find_decoder_layers(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = torch.log_softmax(model(ids).logits, -1)
    perturbation = LayerPerturbation(layers, [0, 1], init_sigma=0.1)
    with perturbation.active(0, 0):
        noisy = torch.log_softmax(model(ids).logits, -1)
    with torch.no_grad():
        perturbation.log_sigma.fill_(-float("inf"))  # σ = exp(-inf) = 0
    with perturbation.active(0, 0):
        zero = torch.log_softmax(model(ids).logits, -1)
    torch.testing.assert_close(zero, clean, rtol=0, atol=0)
    assert (noisy - clean).abs().max().item() > 1e-4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, hidden):
        return torch.tanh(self.linear(hidden)) + hidden


class CheckpointWrapper(nn.Module):
    """Like FSDP's CheckpointWrapper: the whole module call (hooks included) is re-run in backward."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden):
        return checkpoint(self.block, hidden, use_reentrant=False)


class ForwardCheckpointed(nn.Module):
    """Like transformers 5: only `forward` is checkpointed, so the pre-hook runs once, outside."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def _forward(self, hidden):
        return torch.tanh(self.linear(hidden)) + hidden

    def forward(self, hidden):
        return checkpoint(self._forward, hidden, use_reentrant=False)


def _grads(stack, hooked_layers, hidden):
    perturbation = LayerPerturbation(hooked_layers, list(range(len(hooked_layers))), init_sigma=0.3)
    with perturbation.active(5, 1):
        out = hidden
        for layer in stack:
            out = layer(out)
        out.pow(2).sum().backward()
        applied = list(perturbation.applied)
    grads = [p.grad.clone() for layer in stack for p in layer.parameters()]
    for layer in stack:
        layer.zero_grad()
    return out.detach(), grads, perturbation.log_sigma.grad.clone(), applied


def test_noise_identical_under_both_checkpointing_styles():
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Block()])
    hidden = torch.randn(2, 4, 8)
    ref_out, ref_grads, ref_sigma, _ = _grads(list(blocks), blocks, hidden)

    wrapped = nn.ModuleList([CheckpointWrapper(b) for b in blocks])  # hooks on the inner blocks re-run in backward
    out, grads, sigma, applied = _grads(list(wrapped), blocks, hidden)
    assert applied == [2, 2]  # forward + recomputation, both with the same noise
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(sigma, ref_sigma)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)

    torch.manual_seed(0)
    fwd = nn.ModuleList([ForwardCheckpointed(), ForwardCheckpointed()])
    for f, b in zip(fwd, blocks):
        f.linear.load_state_dict(b.linear.state_dict())
    out, grads, sigma, applied = _grads(list(fwd), fwd, hidden)
    assert applied == [1, 1]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(sigma, ref_sigma)


def _checkpointed_run(relative: bool):
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Block()])
    hidden = torch.randn(2, 4, 8)
    perturbation = LayerPerturbation(blocks, [0, 1], init_sigma=0.3, relative=relative)
    with perturbation.active(5, 1):
        out = hidden
        for block in blocks:
            out = CheckpointWrapper(block)(out)  # the hooks re-run in the recomputation
        out.pow(2).sum().backward()
        assert perturbation.applied == [2, 2]
    grads = [p.grad for block in blocks for p in block.parameters()]
    return out.detach(), grads, perturbation.log_sigma.grad, perturbation


@pytest.mark.parametrize("relative", [False, True])
def test_recomputation_hands_its_noise_to_the_backward_bit_for_bit(monkeypatch, relative):
    """Where checkpointing re-runs the hooks, each layer draws ε twice (forward, recomputation) instead of three times:
    the backward takes the recomputation's ε, and everything matches the path that draws it again, to the bit."""
    draws = []
    original = perturbation_module.seeded_noise
    monkeypatch.setattr(perturbation_module, "seeded_noise", lambda *args: draws.append(args[1]) or original(*args))
    out, grads, sigma_grad, perturbation = _checkpointed_run(relative)
    assert len(draws) == 4 and len(set(draws)) == 2  # two layers, each: forward and recomputation, one seed
    assert perturbation._stash._entries == {}  # taken by the backward (and cleared when the hooks go)

    draws.clear()
    monkeypatch.setattr(NoiseStash, "take", lambda *args: None)  # the backward draws ε again
    ref_out, ref_grads, ref_sigma_grad, _ = _checkpointed_run(relative)
    assert len(draws) == 6
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(sigma_grad, ref_sigma_grad, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stash_gives_only_the_noise_of_the_same_seed_and_shape():
    stash, noise = NoiseStash(), torch.randn(2, 3)
    stash.keep(7, noise)
    assert stash.take(8, noise.shape, noise.device) is None
    assert stash.take(7, torch.Size([3, 2]), noise.device) is None
    assert stash.take(7, noise.shape, noise.device) is noise
    assert stash.take(7, noise.shape, noise.device) is None  # taken once


def test_invalid_init_sigma():
    with pytest.raises(ValueError, match="alp_init_sigma"):
        LayerPerturbation(nn.ModuleList([nn.Linear(1, 1)]), [0], init_sigma=0.0)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while running `fn` (via saved-tensor hooks)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_noise_keeps_no_activation_memory():
    hidden = torch.randn(4, 64, 256, requires_grad=True)
    sigma = torch.tensor([0.02], requires_grad=True)
    eps = torch.randn_like(hidden)
    plain = _saved_bytes(lambda: hidden + sigma * eps)  # the textbook formulation keeps ε for dL/dσ
    assert plain >= hidden.numel() * 4
    assert _saved_bytes(lambda: add_seeded_noise(hidden, sigma, seed=1)) == 0
    relative = _saved_bytes(lambda: add_seeded_noise(hidden, sigma, 1, hidden_rms(hidden)))
    assert relative == 4 * 64 * 4  # relative σ keeps only the per-token RMS: (B, S, 1) fp32


def test_cached_generator_gives_the_same_noise_whatever_came_before_and_in_any_thread():
    import threading

    shape, device = torch.Size([3, 5, 7]), torch.device("cpu")
    first = seeded_noise(shape, 11, device)
    seeded_noise(torch.Size([1000]), 12, device)  # another site's draw in between
    torch.testing.assert_close(seeded_noise(shape, 11, device), first, rtol=0, atol=0)
    other: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: other.append(seeded_noise(shape, 11, device)))
    thread.start()
    thread.join()
    torch.testing.assert_close(other[0], first, rtol=0, atol=0)  # e.g. a backward run by another thread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relative", [False, True])
def test_in_place_noise_path_equals_the_plain_formula_bit_for_bit(dtype, relative):
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16).to(dtype).requires_grad_()
    sigma = torch.tensor([0.3], requires_grad=True)
    scale = hidden_rms(hidden) if relative else None
    out = add_seeded_noise(hidden, sigma, 5, scale)
    eps = seeded_noise(hidden.shape, 5, hidden.device)
    eps = eps * scale if relative else eps
    expected = hidden.detach() + (sigma.detach() * eps).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    grad = torch.randn(hidden.shape).to(dtype)
    out.backward(grad)
    torch.testing.assert_close(hidden.grad, grad, rtol=0, atol=0)  # d(h + σε)/dh = identity
    torch.testing.assert_close(sigma.grad, (grad.double() * eps.double()).sum().float().reshape(1))
