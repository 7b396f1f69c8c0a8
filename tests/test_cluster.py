"""Cluster launch paths on one CPU machine: launcher environments, rank-0 decisions, device discipline.

Fast tests check the pieces in-process (rank variables of srun / mpirun, launcher commands, weight-decay groups
under ZeRO-3 shapes, where metric reductions run, the divergence guard). ``slow`` tests start real ranks: the
deepspeed launcher as documented, two torchrun "nodes" on loopback sharing the output directory (one of them in
its own mount namespace, to see the filesystem differently), and srun-style processes with no RANK at all.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import distributed, launch, ranks
from pipeline.artifacts import WEIGHT_DIGESTS_DIR, model_weights_hash
from pipeline.cli import build_parser
from pipeline.config import REPO_ROOT, save_config
from pipeline.errors import ConfigError
from pipeline.logprobs import collate_pairs
from pipeline.plan import Plan
from pipeline.reference.stage import _inference_ds_config, model_parameter_count, reference_stage
from pipeline.throughput import COUNTS
from pipeline.tokenize.stage import tokenize_stage
from pipeline.train.stage import MetricSums, read_summary, weight_decay_groups

CONFIGS = REPO_ROOT / "configs"
DS_ZERO2, DS_ZERO3 = str(CONFIGS / "ds_zero2.json"), str(CONFIGS / "ds_zero3.json")
SMALL = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    per_device_eval_batch_size=8,
    eval_steps=None,
    save_steps=None,
    deepspeed=DS_ZERO2,
)


# ---------------------------------------------------------------------------------------------- launcher env
SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
}


def test_srun_task_variables_become_rank_variables_the_same_on_every_task():
    mapped = ranks.scheduler_rank_environment(SRUN_TASK)
    assert mapped["RANK"] == "1" and mapped["LOCAL_RANK"] == "1" and mapped["WORLD_SIZE"] == "4"
    assert mapped["LOCAL_WORLD_SIZE"] == "2" and mapped["MASTER_ADDR"] == "gpu007"
    other = ranks.scheduler_rank_environment({**SRUN_TASK, "SLURM_PROCID": "3", "SLURM_LOCALID": "1"})
    assert other["MASTER_PORT"] == mapped["MASTER_PORT"] and other["RANK"] == "3"


def test_an_sbatch_script_or_salloc_shell_is_one_process_not_a_rank():
    batch = {k: v for k, v in SRUN_TASK.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    assert ranks.scheduler_rank_environment(batch) == {}


def test_openmpi_ranks_and_the_multi_node_master_they_cannot_guess():
    single = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    assert ranks.scheduler_rank_environment(single)["MASTER_ADDR"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        ranks.scheduler_rank_environment({**single, "OMPI_COMM_WORLD_SIZE": "4"})


def test_a_partial_launcher_environment_is_refused_naming_the_node(monkeypatch):
    for name in (*ranks.RANK_VARIABLES, ranks.NO_LAUNCHER):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=rf"on {os.uname().nodename}: WORLD_SIZE set but RANK not"):
        distributed.prepare_environment()


def test_slurm_node_lists_give_their_first_host():
    assert ranks.first_host("gpu[003-010,012],cpu1") == "gpu003"
    assert ranks.first_host("node7,node8") == "node7"
    assert ranks.first_host("a[1,3]") == "a1"


def test_a_gpu_job_never_falls_back_to_cpu_silently():
    assert not torch.cuda.is_available()  # these machines have none
    with pytest.raises(ConfigError, match="device: cuda, but CUDA is not usable"):
        distributed.use_device("cuda")


def test_the_cli_takes_the_deepspeed_launchers_local_rank_argument():
    args = build_parser().parse_args(["--local_rank=3", "train", "--config", "c.yaml", "beta=0.2"])
    assert args.local_rank == 3 and args.overrides == ["beta=0.2"]


def test_launcher_commands_for_multi_node_torchrun_and_a_deepspeed_hostfile(make_config, tmp_path):
    config = make_config(num_processes=4, num_nodes=2, node_rank=1, rdzv_endpoint="node0.cluster:29400")
    command = launch.stage_command("train", tmp_path / "c.yaml", config)
    text = " ".join(command)
    assert "--nnodes 2 --node_rank 1 --master_addr node0.cluster --master_port 29400" in text
    assert "--nproc_per_node 4" in text
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    deepspeed = launch.stage_command(
        "train", tmp_path / "c.yaml", make_config(launcher="deepspeed", hostfile=str(hostfile), num_processes=8)
    )
    assert Path(deepspeed[0]).name == "deepspeed" and deepspeed[1:3] == ["--hostfile", str(hostfile)]
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        make_config(num_nodes=2)


def test_jobs_get_the_model_as_a_local_path_resolved_once(make_config, tiny_model_dir):
    config = make_config(model_name_or_path=str(tiny_model_dir))
    assert launch.job_config(config).model_name_or_path == str(tiny_model_dir.resolve())


# ---------------------------------------------------------------------------------------------- numerics
def test_weight_decay_groups_use_the_full_shape_of_zero3_partitioned_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for p in model.parameters():  # what ZeRO-3 leaves: empty 1-D data, the real shape in ds_shape
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert [tuple(p.ds_shape) for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_metric_sums_stay_on_the_engines_device_until_the_one_transfer():
    # The meta device stands in for CUDA: a .cpu() or a host scalar on the way would fail or leave meta.
    sums = MetricSums(torch.device("meta"))
    row = dict(example_id=0, prompt_input_ids=[7], chosen_input_ids=[8, 9], rejected_input_ids=[3, 4, 5, 6])
    sums.add(
        {"loss": torch.ones((), device="meta"), "rewards/margins": torch.ones((), device="meta")},
        2,
        collate_pairs([row], pad_token_id=0).to("meta").counts(),  # the throughput counts too
    )
    sums.add_names(["loss", "rewards/margins"])
    reduced = sums.reduced()
    assert reduced.device.type == "meta" and reduced.shape == (2 + 1 + len(COUNTS),)


def test_reference_pass_replicates_a_model_that_fits_and_shards_on_request(make_config, tiny_model_dir):
    assert model_parameter_count(tiny_model_dir) == sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()
    )
    config = make_config(deepspeed=DS_ZERO3)
    assert _inference_ds_config(config, tiny_model_dir)["zero_optimization"] == {"stage": 0}
    forced = _inference_ds_config(config.model_copy(update={"reference_zero_stage": 3}), tiny_model_dir)
    assert forced["zero_optimization"]["stage"] == 3


def test_weights_are_hashed_once_across_processes_and_again_when_a_file_changes(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    (model / "pytorch_model.bin").write_bytes(b"the same weights, pickled: not what from_pretrained loads")
    digest = model_weights_hash(model)
    records = [json.loads(p.read_text()) for p in WEIGHT_DIGESTS_DIR.glob("*.json")]
    assert [r["digest"] for r in records if r["model_dir"] == str(model.resolve())] == [digest]
    assert "pytorch_model.bin" not in {name for r in records for name, *_ in r["files"]}
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pipeline.artifacts import model_weights_hash as h;"
            "import pipeline.artifacts as a; a.hash_files = None; print(h(sys.argv[1]))",
            str(model),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == digest  # remembered: the child could not have hashed (hash_files is gone)
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert model_weights_hash(model) != digest


# ---------------------------------------------------------------------------------------------- real ranks
def _prepare(make_config, **overrides):
    config = make_config(**{**SMALL, **overrides})
    tokenize_stage(config)
    return config


def _cli(args, *, env=None, cwd=REPO_ROOT, timeout=600, **popen):
    env = {**launch.job_environment(), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **popen)


def _losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def _two_nodes(stage: str, config_path: Path, *, node1_prefix: tuple[str, ...] = (), timeout=600):
    """``torchrun --nnodes 2`` twice on loopback, one rank each: two "nodes" sharing the output directory."""
    port = str(ranks.free_port())
    procs = []
    for node in (0, 1):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node_rank",
            str(node),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "-m",
            "pipeline.cli",
            stage,
            "--config",
            str(config_path),
        ]
        procs.append(
            subprocess.Popen(
                [*(node1_prefix if node else ()), *command],
                cwd=REPO_ROOT,
                env={**launch.job_environment(), "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    return outputs


@pytest.mark.slow
def test_two_nodes_of_one_rank_equal_one_node_of_two_ranks(make_config, tmp_path):
    """Reference pass and training as two torchrun nodes and as one node of two ranks: the same artifacts."""
    results = {}
    for layout in ("one-node", "two-nodes"):
        config = _prepare(make_config, output_dir=str(tmp_path / layout), num_processes=2, deepspeed=DS_ZERO3)
        if layout == "one-node":
            reference_stage(config.model_copy(update={"num_processes": 1}))  # 1 process: the same scores
            _cli(
                [sys.executable, "-m", "pipeline.cli", "train", "--config", str(_saved(config, tmp_path, layout))],
                check=True,
            )
        else:
            path = _saved(config.model_copy(update={"num_processes": 1}), tmp_path, layout)
            _two_nodes("reference", path)
            _two_nodes("train", path)
        results[layout] = (config, Plan.of(config.model_copy(update={"num_processes": 1})).train_dir)
    (_, one_dir), (_, two_dir) = results["one-node"], results["two-nodes"]
    assert read_summary(one_dir)["world_size"] == read_summary(two_dir)["world_size"] == 2
    np.testing.assert_allclose(_losses(one_dir), _losses(two_dir), rtol=0, atol=1e-5)
    assert len(_losses(two_dir)) == SMALL["max_steps"]


def _saved(config, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    save_config(config, path)
    return path


@pytest.mark.slow
def test_deepspeed_launcher_with_two_ranks_as_documented(make_config, tmp_path):
    config = _prepare(make_config, output_dir=str(tmp_path / "out"))
    reference_stage(config)
    path = _saved(config, tmp_path, "cfg")
    launcher = str(Path(sys.executable).parent / "deepspeed")
    done = _cli(
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            str(ranks.free_port()),
            "--module",
            "pipeline.cli",
            "train",
            "--config",
            str(path),
        ]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_summary(Plan.of(config).train_dir)["world_size"] == 2


@pytest.mark.slow
def test_srun_style_ranks_with_only_slurm_variables(make_config, tmp_path):
    config = _prepare(make_config, output_dir=str(tmp_path / "out"))
    reference_stage(config)
    path = _saved(config, tmp_path, "cfg")
    port = str(ranks.free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "train", "--config", str(path)],
            cwd=REPO_ROOT,
            env={
                **launch.job_environment(),
                "OMP_NUM_THREADS": "1",
                "MASTER_PORT": port,
                **SRUN_TASK,
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_STEP_TASKS_PER_NODE": "2",
                "SLURM_STEP_NODELIST": "127.0.0.1",
                "SLURM_PROCID": str(r),
                "SLURM_LOCALID": str(r),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "RANK" not in procs[0].args and read_summary(Plan.of(config).train_dir)["world_size"] == 2


@pytest.mark.slow
def test_a_node_that_does_not_see_the_completion_marker_follows_rank_0(make_config, tmp_path):
    """Node 1 runs in its own mount namespace where the finished run dir is an empty directory (what NFS
    attribute caching can show a node for a while): it must still return with rank 0, not start training."""
    config = _prepare(make_config, output_dir=str(tmp_path / "out"), max_steps=2)
    reference_stage(config)
    path = _saved(config, tmp_path, "cfg")
    run_dir = Plan.of(config).train_dir
    _cli([sys.executable, "-m", "pipeline.cli", "train", "--config", str(path)], check=True)
    before = (run_dir / "metrics.jsonl").read_bytes()
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m (a private mount namespace) is not permitted here")
    empty = tmp_path / "empty"
    empty.mkdir()
    hide = ("unshare", "-m", "sh", "-c", f'mount --bind "{empty}" "{run_dir}" && exec "$0" "$@"')
    outputs = _two_nodes("train", path, node1_prefix=hide, timeout=300)
    # Rank 0 says so (log_level passive: info on rank 0, warnings elsewhere); both return the run dir untrained.
    assert "is complete (same inputs): nothing to do" in outputs[0], outputs
    assert all(out.strip().splitlines()[-1] == str(run_dir) and "train:" not in out for out in outputs), outputs
    assert (run_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.slow
def test_two_c10d_nodes_with_different_configs_are_refused_before_any_model_work(make_config, tmp_path):
    config = _prepare(make_config, output_dir=str(tmp_path / "out"))
    reference_stage(config)
    path, other = _saved(config, tmp_path, "cfg"), _saved(config.model_copy(update={"beta": 0.5}), tmp_path, "b")
    endpoint = f"127.0.0.1:{ranks.free_port()}"  # c10d rendezvous here (the others use a static master)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "configs",
                "-m",
                "pipeline.cli",
                "train",
                "--config",
                str(cfg),
            ],
            cwd=REPO_ROOT,
            env={**launch.job_environment(), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node, cfg in ((0, path), (1, other))
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    # c10d assigns ranks by arrival: either node may be rank 0, the message names the other one's beta.
    assert any(
        "rank 1 on" in out
        and "runs another config than rank 0" in out
        and ("beta=0.5 there, 0.1 on rank 0" in out or "beta=0.1 there, 0.5 on rank 0" in out)
        for out in outputs
    ), outputs


def test_weight_decay_is_applied_under_zero3(make_config, tmp_path):
    """ZeRO-3 (partitioned parameters) and ZeRO-0 train to the same weights with weight decay on, and those
    differ from the weights trained without it."""
    from safetensors.torch import load_file

    from pipeline.train.stage import train_stage

    finals = {}
    for name, ds, decay in (("zero3", DS_ZERO3, 0.5), ("zero0", None, 0.5), ("none", None, 0.0)):
        config = _prepare(
            make_config,
            output_dir=str(tmp_path / name),
            deepspeed=ds,
            weight_decay=decay,
            max_steps=2,
            learning_rate=1e-2,
        )
        reference_stage(config)
        finals[name] = load_file(train_stage(config) / "final_model" / "model.safetensors")
    weight = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(finals["zero3"][weight], finals["zero0"][weight], rtol=0, atol=1e-5)
    assert (finals["zero0"][weight] - finals["none"][weight]).abs().max() > 1e-4


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_checkpoint(make_config, tmp_path):
    config = _prepare(make_config, output_dir=str(tmp_path / "out"), save_steps=2)
    reference_stage(config)
    done = _cli(
        [sys.executable, "-m", "pipeline.cli", "train", "--config", str(_saved(config, tmp_path, "c"))],
        env={"DPO_PIPELINE_INJECT_NONFINITE_LOSS_AT_STEP": "3"},
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("dpo-pipeline train: error:")]
    assert len(errors) == 1 and "step 3: non-finite loss (nan)" in errors[0]
    assert "checkpoints/step-2 (step 2)" in errors[0] and "Traceback" not in done.stderr
    assert not (Plan.of(config).train_dir / "checkpoints" / "step-3").exists()


@pytest.mark.slow
def test_tr_dpo_on_two_nodes_equals_one_node_of_two_ranks(make_config, tmp_path):
    """TR-DPO under external launchers: every window inside one job, on two torchrun "nodes" and on one node
    with two ranks; the same losses, the same reference versions and one reference forward per example."""
    runs = {}
    for layout in ("one-node", "two-nodes"):
        config = _prepare(
            make_config,
            output_dir=str(tmp_path / layout),
            sync_ref_model=True,
            ref_model_sync_steps=2,
            max_steps=4,
            ref_model_mixup_alpha=0.5,
            save_reference_versions=True,
        )  # the versions' weights, gathered from the slices
        path = _saved(config, tmp_path, layout)
        if layout == "one-node":
            done = _cli(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "--master_port",
                    str(ranks.free_port()),
                    "-m",
                    "pipeline.cli",
                    "train",
                    "--config",
                    str(path),
                ]
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        else:
            _two_nodes("train", path)
        runs[layout] = Plan.of(config).train_dir
    one, two = runs["one-node"], runs["two-nodes"]
    np.testing.assert_allclose(_losses(one), _losses(two), rtol=0, atol=1e-5)
    summary = read_summary(two)
    assert summary["world_size"] == 2 and summary["reference_versions"] == 2
    assert summary["reference_forwards_per_example"] == 1.0
    from safetensors.torch import load_file

    for name in ("references/v1/model.safetensors", "final_model/model.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), name


def test_a_hostfile_naming_an_unknown_host_is_refused_before_launching(make_config, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\nnode-that-does-not-exist slots=2\n")
    config = make_config(launcher="deepspeed", hostfile=str(hostfile), num_processes=2)
    save_config(config, tmp_path / "c.yaml")
    # In a network namespace of its own (no interfaces): the failed lookup never leaves this process.
    check = (
        "import sys; from pipeline.config import load_config; from pipeline.launch import check_launch;"
        "check_launch(load_config(sys.argv[1]))"
    )
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n (a private network namespace) is not permitted here")
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", check, str(tmp_path / "c.yaml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert "line 2: host 'node-that-does-not-exist' does not resolve" in done.stderr
