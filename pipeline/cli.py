"""``dpo-pipeline <stage> --config PATH [--output-dir DIR] [key=value ...]``

Stages: ``tokenize``, ``reference``, ``train``, ``run`` (all three, as a Prefect flow) and
``build-tiny-model``. With ``num_processes`` > 1 (or ``num_nodes`` > 1, or ``launcher: slurm``), ``reference``
and ``train`` relaunch themselves under their launcher; under a launcher (torchrun, deepspeed, srun, mpirun,
whoever started it) each rank runs the stage in-process, TR-DPO's windows included. User
errors (config, data, artifacts) and storage faults (no space, read-only, a file in the way, permission denied)
print one line and exit 2; there is no traceback for input you can fix.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.ranks import world_size

if TYPE_CHECKING:
    from pipeline.config import DPOPipelineConfig

STAGES = {
    "tokenize": "tokenize the preference dataset into the tokenized Parquet artifact",
    "reference": "score every example with the frozen reference model (DeepSpeed) into Parquet",
    "train": "train the policy with DeepSpeed ZeRO from the cached reference log-probs (TR-DPO when "
    "sync_ref_model is set)",
    "run": "the whole pipeline as a Prefect flow: tokenize -> reference -> train",
    "build-tiny-model": "build the default tiny Llama + tokenizer (no download) into model_name_or_path",
    "config": "print every accepted config key (with --config: the resolved config as YAML)",
}
# Options of a stage itself; any other --key value (TRL's command-line spelling) is a config override.
_STAGE_OPTIONS = {"--config", "--output-dir", "--error-file", "--local_rank", "--local-rank", "-h", "--help"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-pipeline",
        description="Offline DPO pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {k:18s}{v}" for k, v in STAGES.items()),
    )
    # The deepspeed launcher puts --local_rank=N before the stage (LOCAL_RANK is set in the environment too).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", help="YAML config (TRL DPOConfig field names)")
        stage.add_argument("--output-dir", help="overrides output_dir")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, values in YAML")
        # Set by pipeline.launch for its jobs: a refused input is written there as data for the launching process.
        stage.add_argument("--error-file", help=argparse.SUPPRESS)
    return parser


def override_arguments(argv: list[str]) -> list[str]:
    """``--beta 0.1``, ``--beta=0.1`` and a bare ``--bf16`` (true), as TRL's scripts take them, become the
    ``key=value`` overrides the stages read; the stages' own options pass through."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if not token.startswith("--") or name in _STAGE_OPTIONS:
            out.append(token)
            if name in _STAGE_OPTIONS and "=" not in token and i + 1 < len(argv) and name not in ("-h", "--help"):
                out.append(argv[i + 1])  # the option's value, whatever it looks like
                i += 1
        elif "=" in token:
            out.append(token[2:])
        elif token.startswith("--no_") and _known_key(token[5:]) and not _known_key(token[2:]):
            out.append(f"{token[5:]}=false")  # HfArgumentParser's negation of a flag that defaults to true
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{token[2:]}={argv[i + 1]}")
            i += 1
        else:
            out.append(f"{token[2:]}=true")
        i += 1
    return out


def _known_key(key: str) -> bool:
    from pipeline import trl_keys
    from pipeline.config import FIELD_NAMES

    return key in FIELD_NAMES or key in trl_keys.known_keys()


def _log_level(config: DPOPipelineConfig) -> None:
    """``log_level`` for the pipeline's loggers; passive (transformers' default): info on rank 0, warnings
    elsewhere (N ranks would repeat every line)."""
    level = config.log_level
    if level == "passive":
        level = "info" if os.environ.get("RANK", "0") == "0" else "warning"
    logging.getLogger("pipeline").setLevel(level.upper())


def run_command(args: argparse.Namespace) -> None:
    from pipeline.config import describe_keys, load_config, save_config
    from pipeline.lock import output_dir_lock

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.stage == "config" and args.config is None and not overrides:
        print(describe_keys())
        return
    config = load_config(args.config, overrides)
    if args.stage == "config":
        save_config(config, sys.stdout)
        return
    _log_level(config)
    # One run per output directory (pipeline/lock.py); build-tiny-model writes only the model directory.
    with contextlib.nullcontext() if args.stage == "build-tiny-model" else output_dir_lock(config):
        _run_stage(args, config)


def _run_stage(args: argparse.Namespace, config: DPOPipelineConfig) -> None:
    from pipeline.ranks import under_launcher

    if args.stage == "build-tiny-model":
        from pipeline.tiny_model import build_tiny_model

        model_dir = config.resolve_path(config.model_name_or_path)
        assert model_dir is not None, "model_name_or_path is a str, and resolve_path returns None only for None"
        print(build_tiny_model(model_dir))
    elif args.stage == "tokenize":
        from pipeline.tokenize.stage import tokenize_stage

        print(tokenize_stage(config))
    elif args.stage == "run":
        from flows.pipeline_flow import run_pipeline

        run_pipeline(config)
    elif under_launcher() and args.stage == "train" and config.sync_ref_model:
        print(_tr_dpo_in_job(config))
    elif not under_launcher() and (
        config.num_processes > 1
        or config.num_nodes > 1
        or config.launcher == "slurm"
        or (args.stage == "train" and config.sync_ref_model)
    ):
        # TR-DPO is one job for all its windows, even on one process: no launcher and model load per window.
        from pipeline.launch import run_stage

        run_stage(args.stage, config, on_line=print)
    elif args.stage == "reference":
        from pipeline.reference.stage import reference_stage

        print(reference_stage(config))
    else:
        from pipeline.train.stage import train_stage

        print(train_stage(config))


def _tr_dpo_in_job(config):
    """TR-DPO's ``train`` inside a launcher's job: what it needs first (the tokenized artifact, made by rank 0;
    the eval reference against version 0), then every window in this one job (:mod:`pipeline.train.tr_dpo`)."""
    from pipeline.distributed import barrier, init_distributed
    from pipeline.plan import Plan
    from pipeline.ranks import is_main_process
    from pipeline.reference.stage import reference_stage
    from pipeline.tokenize.stage import tokenize_stage
    from pipeline.train.stage import train_stage

    init_distributed(config)
    if is_main_process():
        tokenize_stage(config)
    barrier()
    plan = Plan.of(config)  # the dataset hashed once for both stages
    reference_stage(config, plan)
    return train_stage(config, plan=plan)


def _record_error(path: str, error: PipelineError) -> None:
    """The first rank to refuse writes the record; the others (refusing the same input) leave it."""
    import json
    import socket

    record = {**error.record(), "rank": os.environ.get("RANK", "0"), "host": socket.gethostname()}
    with contextlib.suppress(FileExistsError), open(path, "x") as handle:
        handle.write(json.dumps(record) + "\n")


def quiet_library_warnings() -> None:
    """Warnings that name no setting of the user's: DeepSpeed 0.19's calls of the torch collectives torch 2.13
    deprecates (``reduce_scatter_tensor``, ``all_gather_into_tensor``) warn on every ZeRO step, 190 lines in a
    5-step run; peft's call of transformers' renamed ``is_gradient_checkpointing``. Everything else still shows."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    # peft 0.21 asks transformers 5.23 the old name on every get_peft_model
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")


def main(argv: list[str] | None = None) -> int:
    quiet_library_warnings()
    args = build_parser().parse_args(override_arguments(sys.argv[1:] if argv is None else argv))
    if args.stage != "run":  # under `run`, Prefect's own logging (task names, levels) must stay in charge
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_command(args)
    except (PipelineError, OSError) as exc:
        from pipeline.artifacts import storage_error

        # A storage fault from any file operation (not only the wrapped writes) is the user's to fix, too.
        error = exc if isinstance(exc, PipelineError) else storage_error(exc)
        if error is None:
            raise  # any other OSError is a bug or an unexpected fault: it keeps its traceback
        print(f"dpo-pipeline {args.stage}: error: {error}", file=sys.stderr)
        if args.error_file:
            _record_error(args.error_file, error)
        return 2
    return 0


def process_main() -> int:
    """The process's entry point (``python -m pipeline.cli``, the ``dpo-pipeline`` script): :func:`main`, then the
    process group ended before the interpreter exits. :func:`main` alone leaves the group to its caller, which
    may run more stages in the same process.

    A rank of a multi-process job then leaves through ``os._exit`` once its streams are flushed: every output
    is written and closed by then (artifacts atomically, trackers in the stage's ``finish``), and what is
    skipped is the interpreter's and libtorch's teardown of gloo's threads, whose occasional SIGABRT would
    turn a finished job into a failed one under torchrun."""
    completed = False
    try:
        code = main()
        completed = code == 0
        return code
    finally:
        # Only if a stage ran in this process: the Prefect process never imports torch.
        distributed = sys.modules.get("pipeline.distributed")
        if distributed is not None:
            distributed.end_distributed(completed=completed)
            if completed and world_size() > 1:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)


if __name__ == "__main__":
    sys.exit(process_main())
