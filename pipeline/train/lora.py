"""LoRA and QLoRA on a cached reference: adapters on the frozen base, the base's log-probs scored once.

    dpo-pipeline run --config cfg.yaml use_peft=true lora_r=16 lora_target_modules=all-linear
    dpo-pipeline run --config cfg.yaml use_peft=true load_in_4bit=true bf16=true   # QLoRA (bitsandbytes)

With ``use_peft`` the training recipe wraps the policy with ``peft``'s LoRA (TRL's ``ModelConfig`` names:
``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``, ``lora_modules_to_save``, ``use_rslora``,
``use_dora``) before DeepSpeed sees it, so the optimizer holds the adapters only.

* **No second forward.** TRL's ``DPOTrainer`` with ``peft_config`` scores the reference by running the base a
  second time with the adapters disabled, every step. Here the reference *is* the base model, already scored by
  the reference pass (the same artifact a full fine-tune uses), so a training step is one forward and backward.
  The adapters start at zero (``lora_B`` = 0), so step 0's policy is the base and its loss is ln 2.
* **Dropout** stays off in the base (the cached log-probs were scored without it); ``lora_dropout`` acts on the
  adapter branch only, drawn from each rank's own generator (set it to 0 for loss curves that agree across
  rank counts).
* **Checkpoints** hold the trainable parameters only (``exclude_frozen_parameters``): the base is the model
  directory's, unchanged, so a checkpoint costs the adapters and their optimizer state.
* **Export**: ``final_model/`` is the adapter (``PeftModel.save_pretrained``: ``adapter_config.json``,
  ``adapter_model.safetensors``, plus the tokenizer), loadable with ``PeftModel.from_pretrained``;
  ``save_merged_model: true`` also writes ``final_model_merged/``, the base with the adapters merged in (rank 0
  loads the base in host memory for it), loadable with ``AutoModelForCausalLM``.
* **QLoRA** (``load_in_4bit`` / ``load_in_8bit``): the base is loaded quantised by bitsandbytes in the reference
  pass and in training alike (:func:`pipeline.models.quantization_kwargs`), so the cached reference is the very
  base the adapters train on. The non-quantised parameters keep the training dtype (peft's
  ``prepare_model_for_kbit_training`` would up-cast them to fp32 and the policy at step 0 would no longer be the
  scored base). ZeRO-3 cannot partition quantised weights: QLoRA runs under ZeRO 0-2.
* **TR-DPO** with adapters mixes the merged policy (base + adapter delta) into the reference
  (:class:`pipeline.train.tr_dpo.AdapterReferenceSlices`).

Trade-offs: ``lora_target_modules`` null takes peft's default for the architecture (for Llama, ``q_proj`` and
``v_proj``); TRL users who want every linear layer write ``all-linear``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import DPOPipelineConfig
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

MERGED_MODEL = "final_model_merged"


def lora_config(config: DPOPipelineConfig):
    """peft's ``LoraConfig`` from TRL's ``ModelConfig`` names (as TRL's ``get_peft_config`` builds it)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",  # the only task DPO trains (trl_keys refuses any other lora_task_type)
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        target_parameters=config.lora_target_parameters,
        modules_to_save=config.lora_modules_to_save,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
    )


def add_adapters(model: torch.nn.Module, config: DPOPipelineConfig) -> Any:
    """The policy with LoRA adapters (peft's ``get_peft_model``); a target the model lacks is one line naming
    ``lora_target_modules`` and the model's linear layers. Call after dropout is switched off in the base, so
    ``lora_dropout`` keeps its value."""
    from peft import get_peft_model

    names = [name for name, _ in model.named_modules()]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})

    def no_such_module(targets: list[str]) -> ConfigError:
        return ConfigError(
            f"lora_target_modules: {', '.join(map(repr, targets))} matches no module of this model; its linear "
            f"layers are {', '.join(linear)} (or write all-linear)"
        )

    targets = config.lora_target_modules
    if isinstance(targets, list):
        # peft refuses a list only when no entry matches: a misspelt entry beside a right one would silently
        # train fewer layers than asked. Its rule: a module matches a name it equals or ends with after a dot.
        missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise no_such_module(missing)
    try:
        peft_model = get_peft_model(model, lora_config(config))
    except ValueError as exc:  # a regex (a string target) that matches nothing
        if "not found in the base model" not in str(exc):
            raise
        raise no_such_module([str(targets)]) from None
    if config.gradient_checkpointing:
        # Reentrant checkpointing needs an input that requires grad, and the frozen embeddings give none.
        peft_model.enable_input_require_grads()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in peft_model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in peft_model.parameters())
    log.info("LoRA: %d of %d parameters trainable (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def trainable_state_dict(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor] | None:
    """The trainable parameters by full name, on the host, on the main process (None elsewhere). Collective
    under ZeRO-3, where each is gathered alone: the frozen base (nearly all of a 70B model) never is."""
    import deepspeed

    from pipeline.ranks import is_main_process

    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], enabled=zero3):
            if is_main_process():
                state[name] = p.data.detach().cpu().clone()
    return state if is_main_process() else None


def save_merged(adapter_dir: Path, out: Path, model_dir: Path, config: DPOPipelineConfig) -> None:
    """The base with ``adapter_dir``'s adapter merged in, as a plain model directory; main process only.

    The base is loaded unquantised in the training dtype (a QLoRA adapter merges into the full-precision
    base, as peft's ``merge_and_unload`` does)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.artifacts import atomic_dir
    from pipeline.models import code_kwargs

    dtype = torch.bfloat16 if config.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **code_kwargs(config))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    with atomic_dir(out) as staging:
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)


__all__ = ["MERGED_MODEL", "add_adapters", "lora_config", "save_merged", "trainable_state_dict"]
