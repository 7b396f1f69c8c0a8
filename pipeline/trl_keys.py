"""Every key a TRL / transformers / alignment-handbook DPO YAML may hold that is not a field here, and what
loading a config does with it (the fields themselves: :mod:`pipeline.config`; the full table: docs/trl_keys.md).

A TRL user's YAML must carry over: a key whose behaviour exists here is a config field (or an old name of one,
:data:`ALIASES`); a key that cannot change anything here is accepted and listed once in a warning line
(:data:`NO_EFFECT`); a key whose behaviour is missing is refused, with the reason and the alternative, unless its
value is the one that switches the missing behaviour off (:data:`REFUSED`: ``push_to_hub: false`` is fine,
``push_to_hub: true`` is not). Sources: TRL 1.9 ``DPOConfig`` / ``ModelConfig`` / ``ScriptArguments``,
transformers 5.24 ``TrainingArguments`` (with the keys older versions had), alignment-handbook's
``ScriptArguments`` and recipes.
"""

from __future__ import annotations

from typing import Any

# Older or other names of a field here: renamed when the config is loaded.
ALIASES: dict[str, str] = {
    "torch_dtype": "dtype",  # ModelConfig until TRL 0.26
    "evaluation_strategy": "eval_strategy",  # TrainingArguments until transformers 4.51
    "activation_checkpointing": "gradient_checkpointing",  # transformers >= 5.23's name
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
    "preprocessing_num_workers": "dataset_num_proc",  # alignment-handbook before its mixture rewrite
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "max_target_length": "max_completion_length",  # TRL 0.x
}

# Keys that change nothing this pipeline produces, whatever their value, and why.
NO_EFFECT: dict[str, str] = {
    # how TRL's trainer runs, where this pipeline has one way
    "precompute_ref_log_probs": "the reference log-probs are always precomputed (same values either way)",
    "pad_to_multiple_of": "padding changes no result (masked)",
    "use_liger_kernel": "the log-probs are already computed chunked, without the full-vocabulary float32 logits",
    "liger_kernel_config": "see use_liger_kernel",
    "use_logits_to_keep": "only the completion positions' log-probs are computed already",
    "use_num_logits_to_keep": "see use_logits_to_keep",
    "label_pad_token_id": "labels are masked by completion length, not by a pad id",
    "padding_value": "padding is masked",
    "pad_token": "a tokenizer without a pad token pads with EOS (masked)",
    "is_encoder_decoder": "decoder-only models",
    "remove_unused_columns": "extra dataset columns are ignored",
    "dataset_streaming": "local files are read in batches; Hub datasets go through the datasets cache",
    "streaming": "see dataset_streaming",
    "ignore_bias_buffers": "no DDP buffers to sync under DeepSpeed",
    "use_cache": "no generation during training",
    "generate_during_eval": "evaluation reports reward accuracy and margins, not samples",
    "router_aux_loss_coef": "dense models",
    "base_model_attribute_name": "no Liger loss",
    "use_liger_loss": "see use_liger_kernel",
    # where output goes / how progress shows
    "logging_first_step": "every logging_steps-th step and the last are logged",
    "logging_nan_inf_filter": "a non-finite loss stops the run (TrainingDiverged) instead of being filtered",
    "log_on_each_node": "rank 0 logs",
    "log_level_replica": "ranks other than 0 log warnings only",
    "disable_tqdm": "the progress bar is shown only on rank 0 and only on a terminal or in the job log",
    "include_tokens_per_second": "tokens/s is in the reference manifest and the summary",
    "include_num_input_tokens_seen": "token counts are in the metrics",
    "skip_memory_metrics": "no memory metrics are collected",
    "overwrite_output_dir": "artifacts are content-addressed under output_dir: a changed config writes anew",
    "save_safetensors": "models are saved as safetensors",
    "save_on_each_node": "rank 0 writes to the shared output_dir",
    "resume_from_checkpoint": "a rerun resumes from the newest intact checkpoint of its run by itself",
    "ignore_data_skip": "a resume replays the schedule from its step exactly",
    "restore_callback_states_from_checkpoint": "no callbacks",
    "enable_jit_checkpoint": "checkpoints are written every save_steps",
    "do_train": "the train stage trains",
    "do_eval": "evaluation follows eval_strategy / eval_steps and the eval split",
    "do_predict": "no prediction stage",
    "prediction_loss_only": "evaluation reports the loss and the reward metrics",
    "eval_do_concat_batches": "evaluation accumulates sums, not batches",
    "eval_use_gather_object": "evaluation all-reduces sums",
    "eval_accumulation_steps": "evaluation accumulates sums on the device",
    "batch_eval_metrics": "see eval_accumulation_steps",
    "include_for_metrics": "no compute_metrics",
    "include_inputs_for_metrics": "no compute_metrics",
    "label_names": "no labels column",
    "length_column_name": "no length grouping",
    "past_index": "no past state",
    "jit_mode_eval": "eager evaluation",
    "use_legacy_prediction_loop": "no prediction loop",
    # launching, which the launcher and the ds_config decide here
    "local_rank": "set by the launcher",
    "ddp_backend": "gloo on CPU, nccl for CUDA tensors (pipeline/distributed.py)",
    "ddp_find_unused_parameters": "DeepSpeed reduces gradients itself",
    "ddp_bucket_cap_mb": "see ddp_find_unused_parameters; ZeRO bucket sizes come from the ds_config",
    "ddp_broadcast_buffers": "see ddp_find_unused_parameters",
    "ddp_static_graph": "see ddp_find_unused_parameters",
    "accelerator_config": "no accelerate Accelerator: DeepSpeed engine directly",
    "dispatch_batches": "each rank reads its own examples of the global batch",
    "split_batches": "see dispatch_batches",
    "dataloader_num_workers": "batches are collated from memory-mapped Parquet in the training process",
    "dataloader_pin_memory": "see dataloader_num_workers",
    "dataloader_persistent_workers": "see dataloader_num_workers",
    "dataloader_prefetch_factor": "see dataloader_num_workers",
    "dataloader_multiprocessing_context": "see dataloader_num_workers",
    "dataloader_in_order": "see dataloader_num_workers",
    "dataloader_drop_last": "an epoch's remainder smaller than a global batch is dropped, always",
    "average_tokens_across_devices": "every loss variant averages over pairs, as TRL's DPO does",
    "torch_empty_cache_steps": "no periodic cache emptying",
    "half_precision_backend": "DeepSpeed's bf16",
    "fp16_backend": "see half_precision_backend",
    "fp16_opt_level": "no apex",
    "mp_parameters": "no SageMaker",
    "ray_scope": "no Ray Tune",
    "tpu_metrics_debug": "no TPU",
    "debug": "no debug modes",
    "full_determinism": "runs are deterministic given the seed and the world size",
    "hub_model_id": "no Hub upload (push_to_hub)",
    "hub_strategy": "see hub_model_id",
    "hub_token": "see hub_model_id",
    "hub_private_repo": "see hub_model_id",
    "hub_always_push": "see hub_model_id",
    "hub_revision": "see hub_model_id",
    "hub_model_revision": "see hub_model_id",
    "push_to_hub_model_id": "see hub_model_id",
    "push_to_hub_organization": "see hub_model_id",
    "push_to_hub_token": "see hub_model_id",
    "project": "trackio's project (no trackio here); wandb takes WANDB_PROJECT, mlflow MLFLOW_EXPERIMENT_NAME",
    "trackio_space_id": "no trackio",
    "trackio_bucket_id": "no trackio",
    "trackio_static_space_id": "no trackio",
    # TRL script / `trl` command plumbing
    "config": "the YAML itself",
    "env": "set environment variables before the command",
    "truncation_side": "truncation follows truncation_mode",
    "auto_insert_empty_system_msg": "the chat template decides its system turn",
    "text_column": "preference rows have prompt / chosen / rejected",
    "dataset_splits": "dataset_train_split / dataset_test_split name the splits",
}

# Keys whose behaviour is missing here: (the values that switch it off and are accepted, why, and what to do).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "push_to_hub": (
        (False, None),
        "no Hub upload from the job (compute nodes are often offline); upload "
        "<run dir>/final_model with `huggingface-cli upload` after the run",
    ),
    "fp16": ((False, None), "fp16 training is not supported; use bf16: true (GPUs) or fp32"),
    "fp16_full_eval": ((False, None), "see fp16"),
    "bf16_full_eval": ((False, None), "evaluation runs in the training dtype; set bf16"),
    "lora_task_type": (("CAUSAL_LM",), "DPO trains causal language models"),
    "model_adapter_name": ((None,), "adapters are trained from scratch (use_peft); no existing adapter is loaded"),
    "ref_adapter_name": ((None,), "the reference is the base model, scored once by the reference pass"),
    "force_use_ref_model": ((False,), "no reference model is ever loaded in training: its log-probs are cached"),
    "ref_model_init_kwargs": ((None, {}), "the reference is the policy's initial model"),
    "model_init_kwargs": ((None, {}), "set dtype, attn_implementation, trust_remote_code as keys of their own"),
    "disable_dropout": ((True,), "dropout is always off (the cached reference log-probs were scored without it)"),
    "rpo_alpha": ((None,), "use loss_type: [sigmoid, sft] with loss_weights: [1, alpha] (TRL 1.x's RPO)"),
    "tools": ((None, []), "tool schemas are not passed to the chat template; put tools into the messages"),
    "chat_template": (
        (None,),
        "the tokenizer's own chat template is used; save the template into the model's tokenizer_config.json",
    ),
    "tokenizer_name_or_path": ((None,), "the tokenizer is model_name_or_path's"),
    "base_model_revision": ((None,), "the base model is model_name_or_path at model_revision"),
    "model_code_revision": ((None,), "set model_revision"),
    "datasets": (
        (None, []),
        "write TRL's dataset list as alignment-handbook's dataset_mixture: "
        "{datasets: [{id, config, split, columns, weight}], seed, test_split_size}",
    ),
    "test_split_size": ((None,), "a held-out split of a mixture: dataset_mixture.test_split_size"),
    "dataset_mixer": ((None, {}), "write it as dataset_mixture: {datasets: [{id, split, weight}]}"),
    "dataset_configs": ((None,), "see dataset_mixer"),
    "activation_offloading": ((False,), "activation offloading is not supported; use gradient_checkpointing"),
    "torch_compile": ((False,), "torch.compile is not applied"),
    "torch_compile_backend": ((None,), "see torch_compile"),
    "torch_compile_mode": ((None,), "see torch_compile"),
    "torchdynamo": ((None,), "see torch_compile"),
    "neftune_noise_alpha": ((None,), "NEFTune is an SFT method"),
    "auto_find_batch_size": ((False,), "set per_device_train_batch_size"),
    "load_best_model_at_end": ((False,), "the final model is the last step's; pick a checkpoint from the metrics"),
    "metric_for_best_model": ((None,), "see load_best_model_at_end"),
    "greater_is_better": ((None,), "see load_best_model_at_end"),
    "save_only_model": ((False,), "checkpoints hold the optimizer and schedule, so a rerun resumes exactly"),
    "label_smoothing_factor": ((0, 0.0), "DPO's label smoothing is label_smoothing"),
    "optim_args": (
        (None, ""),
        "set the optimizer's arguments with adam_beta1/adam_beta2/adam_epsilon/"
        "weight_decay, or a ds_config optimizer section",
    ),
    "optim_target_modules": ((None,), "no GaLore / APOLLO optimizers"),
    "eval_delay": ((0, 0.0, None), "evaluation starts with eval_steps"),
    "train_sampling_strategy": (("random",), "the data order is seeded random (pipeline/schedule.py)"),
    "group_by_length": ((False,), "see train_sampling_strategy"),
    "use_cpu": ((False,), "set device: cpu"),
    "no_cuda": ((False,), "set device: cpu"),
    "use_mps_device": ((False,), "no MPS support"),
    "use_ipex": ((False,), "no IPEX support"),
    "tpu_num_cores": ((None,), "no TPU support"),
    "fsdp": (("", None, [], False), "FSDP is not supported; write a DeepSpeed ds_config (deepspeed: ...)"),
    "fsdp_config": ((None, {}), "see fsdp"),
    "fsdp_min_num_params": ((0, None), "see fsdp"),
    "fsdp_transformer_layer_cls_to_wrap": ((None,), "see fsdp"),
    "parallelism_config": ((None,), "data parallel with ZeRO only; no tensor/sequence parallelism"),
    "tp_size": ((0, 1, None), "see parallelism_config"),
    "adafactor": ((False,), "set optim: adafactor"),
}


def known_keys() -> frozenset[str]:
    """Every key of another library's config this module knows (fields here are :mod:`pipeline.config`'s)."""
    return frozenset(ALIASES) | frozenset(NO_EFFECT) | frozenset(REFUSED)
