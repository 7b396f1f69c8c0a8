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
    the reference pass and training must run the same attention implementation)."""
    kwargs: dict[str, object] = {**code_kwargs(config)}
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    return kwargs


__all__ = ["code_kwargs", "model_kwargs", "resolve_model_dir"]
