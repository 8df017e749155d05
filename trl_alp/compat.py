"""The TRL 1.16 internals this package overrides or calls, in one place.

TRL's private methods change between releases without notice. Each one this package relies on is listed here with
the parameter names of the release it was built against (`pyproject.toml` pins ``trl>=1.16,<1.17``);
tests/test_trl_parity.py checks them against the installed TRL, so an upgrade that changes one fails a test instead of
a training run.
"""

# The GRPOTrainer methods `ALPGRPOTrainer` overrides or calls, with their parameter names in TRL 1.16.
GRPO_TRAINER_METHODS = {
    # overridden
    "create_accelerator_and_postprocess": ("self",),
    "create_optimizer": ("self", "model"),
    "training_step": ("self", "model", "inputs", "num_items_in_batch"),
    "_prepare_inputs": ("self", "generation_batch"),
    "_generate": ("self", "prompts"),
    "_generate_single_turn": (
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ),
    "_generate_and_score_completions": ("self", "inputs"),
    "_get_per_token_logps_and_entropies": (
        ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy")
        + ("compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask")
        + ("spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
    ),
    "_compute_loss": ("self", "model", "inputs"),
    "_save_checkpoint": ("self", "model", "trial"),
    "save_model": ("self", "output_dir", "_internal_call"),
    "create_model_card": ("self", "model_name", "dataset_name", "tags"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    # called
    "_get_output_dir": ("self", "trial"),
    "get_gamma_weights": (
        ("advantages", "log_ratio_per_token", "mask", "importance_sampling_ratio")
        + ("k_pos", "lambda_pos", "k_neg", "lambda_neg")
    ),
    "get_off_policy_mask": (
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ),
    "get_high_entropy_mask": ("self", "entropies", "mask", "threshold"),
}
# TRL 1.16's `_generate` returns an 8-tuple whose 5th entry is the rollout log-prob rows (tests check both).
GENERATE_OUTPUTS = 8
GENERATE_LOGPROBS = 4

# The `trl.generation.vllm_generation.VLLMGeneration` methods `ALPVLLMGeneration` overrides or calls.
VLLM_GENERATION_METHODS = {
    "_init_vllm": ("self",),
    "generate": ("self", "prompts", "images", "num_generations", "profiler"),
    "sync_weights": ("self",),
    "_iter_named_params": ("self",),
}

# Extra model inputs (multimodal) that TRL forwards to `_get_per_token_logps_and_entropies` in the loss.
FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
