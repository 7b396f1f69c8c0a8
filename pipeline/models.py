"""Where a config's model lives: one resolution of ``model_name_or_path`` to a local directory.

An existing directory is used as is; the default tiny model (``models/tiny-llama``) is built when missing
(:mod:`pipeline.tiny_model`); any other ``owner/name`` is fetched from the Hugging Face Hub (cached), only the
files ``from_pretrained`` loads. It may build or download, so it is a function a run calls once
(:class:`pipeline.plan.Plan`, the job launcher), not a property of the config.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DPOPipelineConfig
from pipeline.errors import ConfigError
from pipeline.tiny_model import DEFAULT_MODEL_DIR, build_tiny_model


def resolve_model_dir(config: DPOPipelineConfig) -> Path:
    """The local model directory of ``config.model_name_or_path`` (built or downloaded when needed); the
    tokenizer and the reference come from this one directory."""
    path, name = config.resolve_path(config.model_name_or_path), config.model_name_or_path
    assert path is not None, "model_name_or_path is a str, and resolve_path returns None only for None"
    if path.exists():
        return path
    if path.resolve() == DEFAULT_MODEL_DIR.resolve():
        return build_tiny_model(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConfigError(f"model_name_or_path: model directory not found: {path}")
    from huggingface_hub import snapshot_download

    # Only what from_pretrained loads: a snapshot often holds the same weights as .bin and .safetensors (and
    # sometimes GGUF or ONNX copies), which would double the download and every later hash.
    metadata = ["*.json", "*.txt", "*.model", "*.jinja", "*.py"]
    try:
        revision = config.model_revision
        local = Path(snapshot_download(name, revision=revision, allow_patterns=[*metadata, "*.safetensors"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(name, revision=revision, allow_patterns=[*metadata, "*.bin"]))
        return local
    except Exception as exc:  # noqa: BLE001 -- network, auth or missing repo: "this model cannot be had here"
        raise ConfigError(
            f"model_name_or_path: '{name}' is not a local directory and could not be fetched from "
            f"the Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


def code_kwargs(config: DPOPipelineConfig) -> dict[str, bool]:
    """What every ``from_pretrained`` of the model's repository (config, tokenizer, weights) is given."""
    return {"trust_remote_code": config.trust_remote_code}


def model_kwargs(config: DPOPipelineConfig) -> dict[str, object]:
    """What every ``AutoModelForCausalLM.from_pretrained`` is given besides the dtype (policy and reference alike:
    the reference pass and training must run the same attention implementation and the same quantised base)."""
    kwargs: dict[str, object] = {**code_kwargs(config)}
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.load_in_4bit or config.load_in_8bit:
        kwargs.update(quantization_kwargs(config))
    return kwargs


def quantization_kwargs(config: DPOPipelineConfig) -> dict[str, object]:
    """QLoRA's base: bitsandbytes 4-bit (or 8-bit) weights computing in the training dtype, as TRL's
    ``get_quantization_config`` builds it; each rank's copy on its own device (``device_map``), since quantised
    weights cannot be moved after loading as DeepSpeed moves a module."""
    import torch
    from transformers import BitsAndBytesConfig

    key = "load_in_4bit" if config.load_in_4bit else "load_in_8bit"
    try:
        import bitsandbytes  # noqa: F401 -- transformers needs it to quantise; say so before the model loads
    except ImportError:
        raise ConfigError(
            f"{key}: the quantised base needs bitsandbytes; pip install 'dpo-pipeline[qlora]', or set {key}: false"
        ) from None
    from pipeline.distributed import device, on_gpu
    from pipeline.ds_config import qlora_needs_cuda

    if not on_gpu():  # a job that landed on a CPU node (the config check sees only this machine)
        raise ConfigError(qlora_needs_cuda(config))

    compute = torch.bfloat16 if config.bf16 else torch.float32
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=config.bnb_4bit_quant_storage or torch.uint8,
        )
        if config.load_in_4bit
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    return {"quantization_config": quantization, "device_map": {"": device()}}


__all__ = ["code_kwargs", "model_kwargs", "resolve_model_dir"]
