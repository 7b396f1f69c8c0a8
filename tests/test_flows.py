"""Prefect orchestration, for real: Prefect's test harness (a temporary API server) for the flows, and a real
``prefect server`` on 127.0.0.1 with a worker and ``serve`` for the deployment and cancellation tests."""

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

# Prefect reads its settings once, on import: give the tests their own Prefect home (no developer profile, no
# server of theirs), no analytics (else a harmless "database is locked" log), and no API URL (the harness or the
# server started below provides one).
_PREFECT_HOME = tempfile.mkdtemp(prefix="dpo-test-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ.update(PREFECT_HOME=_PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED="false")
os.environ.pop("PREFECT_API_URL", None)

import psutil  # noqa: E402
import pytest  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.jobs import kill_flow_run_groups  # noqa: E402
from flows.pipeline_flow import dpo_pipeline  # noqa: E402
from pipeline import cli  # noqa: E402
from pipeline.config import REPO_ROOT, load_config, save_config  # noqa: E402
from pipeline.metrics import read_summary  # noqa: E402
from pipeline.plan import Plan  # noqa: E402
from pipeline.ranks import free_port  # noqa: E402

DEFAULT_CONFIG = str(REPO_ROOT / "configs" / "default.yaml")
PREFECT = str(Path(sys.executable).parent / "prefect")
# configs/default.yaml shrunk: two TR-DPO windows of 2 steps, an eval and a checkpoint every 2 steps.
TINY = {"max_steps": 4, "ref_model_sync_steps": 2, "eval_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4}


@pytest.fixture(scope="session")
def prefect_api():
    # A loaded 2-core machine can take over 30 s (the default) to start the harness's server.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def tiny(make_config):
    """``tiny(**extra)``: flow overrides of configs/default.yaml for the tiny model, 64/32 rows, a temp output."""
    small = make_config().subset("model_name_or_path", "dataset_name", "output_dir", "max_length", "max_prompt_length")
    return lambda **extra: {**small, **TINY, **extra}


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def task_runs(flow_run_id) -> dict[str, object]:
    """The task runs of a flow run by task name (``reference-window-0-a1b`` -> ``reference-window-0``)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run for run in runs}


def state_counts(flow_run_id) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in task_runs(flow_run_id).values():
        counts[run.state.name] = counts.get(run.state.name, 0) + 1
    return counts


def artifacts(flow_run_id) -> dict[str, list]:
    """The Prefect artifacts of a flow run by key (a key repeats: one progress artifact per job)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key: dict[str, list] = {}
    for artifact in found:
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key


def snapshot(config) -> dict[str, bytes]:
    """Job logs and every artifact manifest of a run: unchanged bytes mean no model work happened."""
    root = config.output_path
    return {str(p.relative_to(root)): p.read_bytes() for p in [*root.glob("logs/*.log"), *root.rglob("manifest.json")]}


def latest_flow_run_id():
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)[0].id


def job_processes(output_dir: Path) -> list[psutil.Process]:
    """Live processes of the stage jobs writing under ``output_dir`` (their config is in ``<output_dir>/jobs``)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(output_dir) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def stage_ranks(output_dir: Path, stage: str) -> list[psutil.Process]:
    """The rank processes (not the launcher) of a running ``stage`` job."""
    return [
        p
        for p in job_processes(output_dir)
        if f"pipeline.cli {stage}" in " ".join(p.info["cmdline"])
        and "torch.distributed.run" not in " ".join(p.info["cmdline"])
    ]


# ---------------------------------------------------------------------------------------------- harness
@pytest.mark.slow
def test_full_tiny_default_run_then_a_rerun_is_all_cached(prefect_api, tiny, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    save_config(load_config(DEFAULT_CONFIG, tiny()), config_file)
    config = load_config(config_file)

    assert cli.main(["run", "--config", str(config_file)]) == 0  # the README's first command
    first = latest_flow_run_id()
    run_dir = Plan.of(config).train_dir
    printed = capsys.readouterr().out
    assert str(run_dir) in printed and "loss.png" in printed and "eval reward accuracy" in printed
    summary = read_summary(run_dir)
    assert summary["reference_versions"] == 2 and summary["reference_forwards_per_example"] == 1.0
    assert 0.0 <= summary["eval_reward_accuracy"] <= 1.0
    runs = task_runs(first)
    assert sorted(runs) == ["reference-pass", "tokenize", "train"]  # TR-DPO's windows all run in the one job
    assert state_counts(first) == {"Completed": 3}
    published = artifacts(first)
    [table], [report] = published["dpo-final-metrics"], published["dpo-run-report"]
    assert table.type == "table" and "eval_reward_accuracy" in table.data
    assert report.data.count("data:image/png;base64,") == 3 and run_dir.name in report.data
    assert "reference v1" in report.data and "window 1 reference" in report.data
    assert [a.data for a in published["train-progress"]] == [100]
    assert [a.data for a in published["reference-progress"]] == [100]
    # The windows while they ran: one markdown version per window start, the last naming both.
    windows = published["train-tr-dpo-windows"]
    assert len(windows) == 2
    assert any("| 1/2 | 1-2 | v0 |" in a.data and "| 2/2 | 3-4 | v1 |" in a.data for a in windows)

    before = snapshot(config)
    rerun = dpo_pipeline(config_path=str(config_file), return_state=True)
    assert rerun.is_completed()
    # Every task comes from Prefect's cache, training (all its windows) included.
    assert state_counts(rerun.state_details.flow_run_id) == {"Cached": 3}
    assert snapshot(config) == before


def _kill_training_rank_after_checkpoint(run_dir: Path, output_dir: Path, killed: list[int]) -> None:
    wait_until(
        (run_dir / "checkpoints" / "step-2" / "trainer_state.json").is_file, 300, "the first checkpoint", interval=0.05
    )
    for rank in stage_ranks(output_dir, "train"):
        rank.kill()
        killed.append(rank.pid)


@pytest.mark.slow
def test_changed_beta_reruns_only_training_which_resumes_when_its_job_is_killed(prefect_api, tiny):
    overrides = tiny(sync_ref_model=False, max_steps=12, eval_steps=None)
    first = dpo_pipeline(config_path=DEFAULT_CONFIG, overrides=overrides, return_state=True)
    assert state_counts(first.state_details.flow_run_id) == {"Completed": 3}
    config = load_config(DEFAULT_CONFIG, overrides)
    before = snapshot(config)

    changed = load_config(DEFAULT_CONFIG, overrides | {"beta": 0.3})
    old_plan, new_plan = Plan.of(config), Plan.of(changed)
    assert new_plan.reference_dir == old_plan.reference_dir and new_plan.train_dir != old_plan.train_dir
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_training_rank_after_checkpoint, args=(Plan.of(changed).train_dir, changed.output_path, killed)
    )
    killer.start()
    second = dpo_pipeline(config_path=DEFAULT_CONFIG, overrides=overrides | {"beta": 0.3}, return_state=True)
    killer.join()

    assert second.is_completed() and killed
    runs = task_runs(second.state_details.flow_run_id)
    assert {name: run.state.name for name, run in runs.items()} == {
        "tokenize": "Cached",
        "reference-pass": "Cached",
        "train": "Completed",
    }
    assert runs["train"].run_count == 2  # the killed job, then the retry
    after = snapshot(changed)
    assert all(after[name] == content for name, content in before.items() if not name.startswith("logs/train"))
    train_log = (changed.output_path / "logs" / "train.log").read_text()
    assert int(re.search(r"resumed from \S+ at step (\d+) of 12", train_log)[1]) >= 2
    records = [json.loads(line) for line in (Plan.of(changed).train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))  # each step once, across the kill


def test_invalid_config_fails_the_flow_before_any_work(prefect_api, tiny):
    overrides = tiny(beta=-1.0)
    state = dpo_pipeline(config_path=DEFAULT_CONFIG, overrides=overrides, return_state=True)
    assert state.is_failed()
    assert "beta: must be > 0 (got -1.0)" in state.message
    assert task_runs(state.state_details.flow_run_id) == {}
    assert not Path(overrides["output_dir"]).exists()


def test_a_stage_job_that_refuses_its_input_fails_the_flow_with_that_error_without_retry(prefect_api, tiny, tmp_path):
    # An explicit global batch the job's world size contradicts: only the training job, knowing its ranks, can
    # tell (a ds_config that is wrong by itself is refused when the config is loaded, before any job).
    ds_config = tmp_path / "ds_batch.json"
    ds_config.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 0}}))
    state = dpo_pipeline(config_path=DEFAULT_CONFIG, overrides=tiny(deepspeed=str(ds_config)), return_state=True)
    assert state.is_failed()
    # The rank's own error, with its type (from the job's error record, not from its log).
    assert re.search(r"ConfigError: .*sets train_batch_size=999 but .*; set it to \"auto\"", state.message), (
        state.message
    )
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["reference-pass"].state.name == "Completed"
    assert runs["train"].state.name == "Failed" and runs["train"].run_count == 1  # not retried


def test_unreachable_prefect_api_is_one_clear_line(make_config, tmp_path, capsys):
    config_file = tmp_path / "cfg.yaml"
    save_config(make_config(), config_file)
    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        assert cli.main(["run", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dpo-pipeline run: error: the Prefect API at {url} is unreachable")
    assert "prefect server start" in err and len(err.splitlines()) == 1


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_flow_run_groups_ends_whole_groups_of_that_run_only():
    def group(flow_run_id):  # a leader and its child, like a launcher and a rank, tagged like a runner's flow run
        script = (
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
        )
        return subprocess.Popen(
            [sys.executable, "-c", script],
            start_new_session=True,
            env={**os.environ, "PREFECT__FLOW_RUN_ID": flow_run_id},
        )

    run_id = str(uuid.uuid4())
    mine, other = group(run_id), group(str(uuid.uuid4()))
    try:
        [child] = wait_until(lambda: psutil.Process(mine.pid).children(), 30, "the leader's child", interval=0.05)
        assert kill_flow_run_groups(run_id) == 1
        mine.wait(timeout=10)
        wait_until(lambda: _gone(child), 10, "the child to end with its group", interval=0.05)
        assert other.poll() is None
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()


# ---------------------------------------------------------------------------------------------- real server
@contextmanager
def background(command: list[str], env: dict[str, str], log: Path):
    """A long-running process (server, worker, serve) in its own group, ended with its whole group."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 with its own home and database; yields the env that talks to it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    with background(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home / "server.log"
    ) as server:

        def healthy():
            assert server.poll() is None, (home / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, 180, "the Prefect server")
        client_env = {**env, "PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        with temporary_settings({PREFECT_API_URL: url}):  # this process's client talks to it too
            yield client_env


def prefect(env, *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )  # the assert below shows the output on failure
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def trigger(env, overrides: dict, *extra: str, timeout: float = 120) -> tuple[str, str]:
    """``prefect deployment run`` with ``overrides``; config_path stays the deployment's (repo-relative) default."""
    out = prefect(
        env,
        "deployment",
        "run",
        "dpo-pipeline/dpo-pipeline",
        "--params",
        json.dumps({"overrides": overrides}),
        *extra,
        timeout=timeout,
    )
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out)[1], out


def flow_run(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id))


@pytest.mark.slow
def test_deployment_round_trip(prefect_server, tiny, tmp_path):
    env = prefect_server
    prefect(env, "work-pool", "create", "dpo-local", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("dpo-pipeline/dpo-pipeline")
    assert deployment.parameters["config_path"] == "configs/default.yaml"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.global_concurrency_limit.limit == 1  # an overlapping run waits for a slot
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"

    overrides = tiny(sync_ref_model=False, max_steps=2, eval_steps=None, save_steps=None)
    with background([PREFECT, "worker", "start", "--pool", "dpo-local"], env, tmp_path / "worker.log"):
        run_id, out = trigger(env, overrides, "--watch", "--watch-timeout", "500", timeout=600)
    run = flow_run(run_id)
    assert run.state.is_completed(), out + (tmp_path / "worker.log").read_text()[-3000:]
    config = load_config(DEFAULT_CONFIG, overrides)
    assert read_summary(Plan.of(config).train_dir)["num_steps"] == 2
    assert {"dpo-final-metrics", "dpo-run-report", "train-progress", "reference-progress"} <= set(artifacts(run.id))


def _run_processes(run_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PREFECT__FLOW_RUN_ID") == run_id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_cancelling_a_served_run_leaves_no_process(prefect_server, tiny, tmp_path):
    env = prefect_server
    overrides = tiny(sync_ref_model=False, max_steps=100_000, eval_steps=None, save_steps=None)
    output_dir = Path(overrides["output_dir"])
    log = tmp_path / "serve.log"
    with background([sys.executable, "-m", "flows.serve"], env, log):
        wait_until(lambda: "is being served" in log.read_text(), 120, "flows.serve to start serving")
        run_id, _ = trigger(env, overrides)
        # A training rank (not only its launcher) is running: the job is as deep in its work as it gets.
        wait_until(lambda: stage_ranks(output_dir, "train"), 300, "the training job's rank process")
        prefect(env, "flow-run", "cancel", run_id)
        wait_until(lambda: flow_run(run_id).state.is_cancelled(), 120, "the run to be cancelled")
        wait_until(
            lambda: not job_processes(output_dir) and not _run_processes(run_id),
            30,
            "every process of the cancelled run to end",
        )
    assert "Cancelled" in flow_run(run_id).state.name
