"""report_to trackers with the real libraries: what each writes is read back from its own files.

TensorBoard's event files through TensorBoard's EventAccumulator, wandb's offline run file through wandb's own
reader (``wandb leet inspect --json``), MLflow's store through ``MlflowClient``. No network: wandb runs offline,
MLflow on a SQLite file in the run dir (the one unreachable server is a closed port on localhost).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.errors import ConfigError
from pipeline.trackers import Trackers, check_trackers, flatten_params, rewrite_logs, run_id, tracker_names

TRAIN = [
    {"step": s, "epoch": s / 3, "loss": 0.7 - s / 10, "rewards/accuracies": 0.5 + s / 10, "logps/rejected": -10.0 * s}
    | {"learning_rate": 1e-3 / s, "note": "not a metric", "diverged": False}
    for s in (1, 2, 3)
]
TRAIN[1]["grad_norm"] = float("nan")  # logged as it is, as the HF Trainer does
EVAL = {"step": 3, "eval_loss": 0.55, "eval_rewards/accuracies": 0.8}
SYNC = {"reference_version": 2, "mix_seconds": 0.1, "score_seconds": 1.2, "examples": 64, "kind": "mix"}
# "eval/loss" is also a wandb history name: the summary's value must win over the last row's.
SUMMARY = {"final": {"eval_loss": 0.55, "steps": 3}, "eval/loss": 0.5, "status": "complete", "plots": ["a.png"]}
PARAMS = {"beta": 0.1, "loss_type": "sigmoid", "lora_target_modules": ["q_proj", "v_proj"], "fingerprints/train": "f0"}

# The metrics each tracker must hold, by its own names: {name: {step: value}}.
NUMERIC = ("epoch", "loss", "rewards/accuracies", "logps/rejected", "learning_rate", "grad_norm")
PLAIN = {key: {r["step"]: r[key] for r in TRAIN if key in r} for key in NUMERIC}
PLAIN |= {"eval_loss": {3: 0.55}, "eval_rewards/accuracies": {3: 0.8}}
PLAIN |= {f"tr_dpo/{key}": {3: SYNC[key]} for key in ("reference_version", "mix_seconds", "score_seconds", "examples")}
TRL = {name: points for name, points in PLAIN.items() if name.startswith("tr_dpo/")}
TRL |= rewrite_logs({name: points for name, points in PLAIN.items() if not name.startswith("tr_dpo/")})


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """wandb offline and silent, every tracker's home in tmp_path, no MLflow server; the working directory is
    an empty folder, so that a tracker writing outside the run dir shows."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def make(tmp_path: Path, **values):
    return load_config(None, {"model_name_or_path": "m", "dataset_name": "d", "output_dir": str(tmp_path), **values})


def run_dir_of(tmp_path: Path) -> Path:
    run_dir = tmp_path / "train" / "0123456789abcdef"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run(trackers: Trackers) -> None:
    for record in TRAIN:
        trackers.log(record)
    trackers.log(EVAL)
    trackers.event("tr_dpo/sync", 3, SYNC)
    trackers.close(SUMMARY)
    trackers.close(SUMMARY)  # a second close does nothing


def assert_points(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], rel: float) -> None:
    assert set(got) == set(expected)
    for name, points in expected.items():
        assert set(got[name]) == set(points), name
        for step, value in points.items():
            if math.isnan(value):
                assert math.isnan(float(got[name][step])), name
            else:
                assert got[name][step] == pytest.approx(value, rel=rel), (name, step)


def wandb_core_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]


# ---------------------------------------------------------------------------------------------- TensorBoard
def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, list[tuple[int, str]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: one point per step"
        scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    texts = {
        tag.removesuffix("/text_summary"): [
            (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(tag)
        ]
        for tag in events.Tags()["tensors"]
    }
    return scalars, texts


def test_tensorboard_writes_trls_names_at_their_steps_and_the_params_as_text(tmp_path):
    run_dir = run_dir_of(tmp_path)
    trackers = Trackers.open(make(tmp_path, report_to="tensorboard"), run_dir, params=PARAMS)
    assert trackers.names == ["tensorboard"]
    write_run(trackers)

    scalars, texts = tensorboard_scalars(run_dir / "runs")
    assert_points(scalars, TRL, rel=1e-6)  # TensorBoard keeps float32
    assert json.loads(texts["args"][0][1]) == PARAMS  # HF's "args" text, indented into a markdown code block
    step, table = texts["tr_dpo/sync"][0]
    assert step == 3 and "| reference_version | 2 |" in table and "| kind | mix |" in table
    assert "| final.eval_loss | 0.55 |" in texts["summary"][0][1] and "| status | complete |" in texts["summary"][0][1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["runs"] and not any(Path.cwd().iterdir())


def test_a_resumed_tensorboard_run_drops_what_an_earlier_attempt_logged_after_the_checkpoint(tmp_path):
    run_dir, log_dir = run_dir_of(tmp_path), tmp_path / "tb"
    config = make(tmp_path, report_to=["tensorboard"], logging_dir=str(log_dir))
    crashed = Trackers.open(config, run_dir, params=PARAMS)
    for step in range(1, 6):
        crashed.log({"step": step, "loss": float(step)})
    crashed.close()  # it "crashed" after step 5; its last checkpoint is step 3

    resumed = Trackers.open(config, run_dir, params=PARAMS, resume_step=3)
    for step in (4, 5, 6):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()

    scalars, _ = tensorboard_scalars(log_dir)
    assert scalars == {"train/loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}}
    assert not (run_dir / "runs").exists()

    restarted = Trackers.open(config, run_dir, params=PARAMS)  # a fresh start: no earlier point stays
    restarted.log({"step": 1, "loss": 0.5})
    restarted.close()
    assert tensorboard_scalars(log_dir)[0] == {"train/loss": {1: 0.5}}


# ---------------------------------------------------------------------------------------------- wandb
def wandb_records(run_dir: Path) -> list[list[dict]]:
    """Every offline run's records, oldest first, read by wandb's own reader of its transaction log."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    reader = [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json"]
    return [
        [json.loads(line) for line in subprocess.run([*reader, str(f)], capture_output=True, text=True, check=True)
         .stdout.splitlines()]
        for f in runs
    ]  # fmt: skip


def wandb_history(records: list[dict]) -> dict[str, dict[int, float]]:
    points: dict[str, dict[int, float]] = {}
    for record in records:
        if record["type"] == "history":
            step = int(record["history"]["step"]["num"])
            for key, value in record["history"]["item"].items():
                if not key.startswith("_"):
                    points.setdefault(key, {})[step] = value
    return points


def test_wandb_offline_run_holds_the_config_the_rows_by_step_and_the_summary(tmp_path):
    run_dir = run_dir_of(tmp_path)
    trackers = Trackers.open(make(tmp_path, report_to="wandb", run_name="my-run"), run_dir, params=PARAMS)
    assert wandb_core_children()  # wandb's service process, which close() must stop
    write_run(trackers)
    assert not wandb_core_children()

    [records] = wandb_records(run_dir)
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert (run["display_name"], run["run_id"], run["project"]) == ("my-run", run_id(run_dir), "huggingface")
    assert run_id(run_dir).startswith("0123456789abcdef-")
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert {k: v for k, v in config.items() if k != "_wandb"} == PARAMS
    # HF's WandbCallback rows: TRL's names plus train/global_step, one row per step (train, eval, event merged)
    assert_points(wandb_history(records), TRL | {"train/global_step": {1: 1, 2: 2, 3: 3}}, rel=0)
    summary = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert {k: summary[k] for k in ("final.eval_loss", "final.steps", "status", "eval/loss")} == {
        "final.eval_loss": 0.55,
        "final.steps": 3,
        "status": "complete",
        "eval/loss": 0.5,
    }
    assert "plots" not in summary and not any(Path.cwd().iterdir())


def test_a_resumed_wandb_run_keeps_the_run_id_and_logs_the_steps_after_the_checkpoint(tmp_path):
    run_dir = run_dir_of(tmp_path)
    config = make(tmp_path, report_to="wandb")
    first = Trackers.open(config, run_dir, params=PARAMS)
    first.log({"step": 1, "loss": 0.6})
    first.close(failed=True)
    second = Trackers.open(config, run_dir, params=PARAMS, resume_step=1)
    second.log({"step": 2, "loss": 0.5})
    second.close()
    assert not wandb_core_children()

    crashed, resumed = wandb_records(run_dir)
    assert {r["run"]["run_id"] for r in crashed + resumed if r["type"] == "run"} == {run_id(run_dir)}
    assert [r["exit"].get("exit_code", 0) for r in crashed + resumed if r["type"] == "exit"] == [1, 0]
    assert wandb_history(resumed) == {"train/loss": {2: 0.5}, "train/global_step": {2: 2}}


# ---------------------------------------------------------------------------------------------- MLflow
def test_mlflow_store_in_the_run_dir_holds_params_metrics_by_step_and_a_resume_reuses_the_run(tmp_path):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    run_dir = run_dir_of(tmp_path)
    config = make(tmp_path, report_to="mlflow", run_name="my-run")
    params = PARAMS | {"dataset_mixture.datasets": "x" * 7000, "odd key (1)": 1}
    write_run(Trackers.open(config, run_dir, params=params))

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dpo-pipeline")
    [run] = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("my-run", "FINISHED")
    assert run.data.params == {
        "beta": "0.1",
        "loss_type": "sigmoid",
        "lora_target_modules": '["q_proj", "v_proj"]',
        "fingerprints/train": "f0",
        "dataset_mixture.datasets": "x" * MAX_PARAM_VAL_LENGTH,  # cut to MLflow's limit
        "odd key _1_": "1",  # characters MLflow refuses replaced, as HF's callback does
    }
    history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} for name in PLAIN}
    assert_points(history, PLAIN, rel=0)  # HF's MLflowCallback names: the record's own
    names = ("final.eval_loss", "final.steps", "eval/loss")
    summary = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] for name in names}
    assert summary == {"final.eval_loss": [(3, 0.55)], "final.steps": [(3, 3.0)], "eval/loss": [(3, 0.5)]}
    assert run.data.tags["status"] == "complete" and run.data.tags["dpo_pipeline.run_dir"] == str(run_dir)

    resumed = Trackers.open(config, run_dir, params=params | {"logging_steps": 5}, resume_step=3)
    resumed.log({"step": 4, "loss": 0.25})
    resumed.close()
    [again] = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["logging_steps"] == "5"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")][-1] == (4, 0.25)
    assert sorted(p.name for p in run_dir.iterdir()) == ["mlflow.db"] and not any(Path.cwd().iterdir())


def test_a_tracker_failing_mid_run_is_dropped_with_a_warning_and_training_goes_on(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    run_dir = run_dir_of(tmp_path)
    trackers = Trackers.open(make(tmp_path, report_to=["mlflow", "tensorboard"]), run_dir, params=PARAMS)
    trackers.log(TRAIN[0])
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("dpo-pipeline").experiment_id])
    client.delete_run(run.info.run_id)  # a real failure: MLflow refuses metrics of a deleted run
    trackers.log(TRAIN[1])
    assert trackers.names == ["tensorboard"]
    assert "report_to: mlflow failed to log" in caplog.text
    trackers.log(TRAIN[2])
    trackers.close()
    scalars, _ = tensorboard_scalars(run_dir / "runs")
    assert scalars["train/loss"] == {1: pytest.approx(0.6), 2: pytest.approx(0.5), 3: pytest.approx(0.4)}


def test_an_unreachable_mlflow_server_is_a_one_line_config_error_at_open(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on: refused at once, no traffic leaves the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    config = make(tmp_path, report_to=["tensorboard", "mlflow"])
    with pytest.raises(ConfigError) as refused:
        Trackers.open(config, run_dir_of(tmp_path), params=PARAMS)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("report_to: mlflow could not start")
    assert f"check MLFLOW_TRACKING_URI (http://127.0.0.1:{port})" in message


# ---------------------------------------------------------------------------------------------- which ones
def test_report_to_none_writes_nothing_and_all_is_every_installed_tracker(tmp_path):
    run_dir = run_dir_of(tmp_path)
    trackers = Trackers.open(make(tmp_path), run_dir, params=PARAMS)  # report_to defaults to none
    assert trackers.names == []
    write_run(trackers)
    assert not any(run_dir.iterdir()) and not any(Path.cwd().iterdir())

    assert tracker_names(make(tmp_path, report_to="all")) == ["tensorboard", "wandb", "mlflow"]
    assert tracker_names(make(tmp_path, report_to=["mlflow", "tensorboard", "mlflow"])) == ["mlflow", "tensorboard"]
    assert tracker_names(make(tmp_path, report_to=None)) == []
    check_trackers(make(tmp_path, report_to="all"))


BLOCKED = """
import json, sys
sys.modules["wandb"] = None  # a real import failure, as when wandb is not installed
import pipeline.trackers as trackers
heavy = sorted(m for m in ("torch", "mlflow", "tensorboard", "deepspeed", "transformers") if m in sys.modules)
from pipeline.config import load_config
def config(report_to):
    return load_config(None, {"model_name_or_path": "m", "dataset_name": "d", "report_to": report_to})
messages = []
for call in (lambda: trackers.check_trackers(config(["tensorboard", "wandb"])),
             lambda: trackers.Trackers.open(config("wandb"), __import__("pathlib").Path("run"), params={})):
    try:
        call()
    except trackers.ConfigError as exc:
        messages.append(str(exc))
print(json.dumps({"heavy": heavy, "messages": messages, "all": trackers.tracker_names(config("all"))}))
"""


def test_a_tracker_that_cannot_be_imported_is_refused_naming_the_fix_and_all_skips_it():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED], cwd=Path.cwd(), capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["heavy"] == []  # importing the module imports no tracker library, nor torch
    assert out["all"] == ["tensorboard", "mlflow"]
    assert len(out["messages"]) == 2 and out["messages"][0] == out["messages"][1]
    message = out["messages"][0]
    assert message.startswith("report_to: wandb needs its package, which cannot be imported here (")
    assert "pip install 'dpo-pipeline[wandb]'" in message and "report_to: none" in message and "\n" not in message
    assert not any(Path.cwd().iterdir())


def test_names_and_params_helpers():
    # The HF Trainer's own rewrite, word for word (transformers' integration_utils.rewrite_logs).
    logs = {"loss": 1.0, "eval_loss": 2.0, "test_loss": 3.0, "rewards/chosen": 4.0, "eval_rewards/chosen": 5.0}
    assert rewrite_logs(logs) == {
        "train/loss": 1.0,
        "eval/loss": 2.0,
        "test/loss": 3.0,
        "train/rewards/chosen": 4.0,
        "eval/rewards/chosen": 5.0,
    }
    tree = {"a": {"b": 1, "c": {"d": None}}, "e": [1, {"f": 2}], "g": {}}
    assert flatten_params(tree) == {"a.b": 1, "a.c.d": None, "e": [1, {"f": 2}], "g": {}}
    assert run_id(Path("/x/train/abc")) != run_id(Path("/y/train/abc"))  # two output dirs, two runs
    assert run_id(Path("/x/train/abc")) == run_id(Path("/x/./train/abc"))


# ---------------------------------------------------------------------------------------------- in training
def test_a_lora_tr_dpo_training_run_reports_its_metrics_params_syncs_and_throughput(make_config):
    """The recipe's records, as metrics.jsonl holds them, in every tracker at their steps; the fingerprints as
    run parameters; each TR-DPO sync as an event; tokens/s and MFU per step and in the summary."""
    from mlflow.tracking import MlflowClient

    from pipeline.plan import Plan
    from pipeline.reference.stage import reference_stage
    from pipeline.tokenize.stage import tokenize_stage
    from pipeline.train.stage import read_summary, train_stage

    config = make_config(
        report_to="all",
        run_name="lora-tr-dpo",
        use_peft=True,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
        sync_ref_model=True,
        ref_model_sync_steps=2,
        max_steps=4,
        eval_steps=2,
        per_device_eval_batch_size=16,
        deepspeed=str(REPO_ROOT / "configs" / "ds_zero2.json"),
    )
    tokenize_stage(config)
    reference_stage(config)
    run = train_stage(config)
    assert not wandb_core_children()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert all(r["tokens_per_second"] > 0 and r["mfu"] > 0 and 0 <= r["padding_fraction"] < 1 for r in train)
    plain: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "epoch"):
                plain.setdefault(key, {})[record["step"]] = value
    # The sync that opens window 2 (at step 2); window 1's reference is version 0, scored at setup.
    sync = {"tr_dpo/reference_version": {2: 1.0}, "tr_dpo/examples": {2: 8.0}}
    fingerprint = Plan.of(config).train_fingerprint

    scalars, texts = tensorboard_scalars(run / "runs")
    for name in ("loss", "rewards/accuracies", "logps/rejected", "mfu", "eval_loss", "eval_rewards/accuracies"):
        [(trl_name, points)] = rewrite_logs({name: plain[name]}).items()
        assert scalars[trl_name] == pytest.approx(points, rel=1e-6), name
    assert {name: scalars[name] for name in sync} == sync
    assert json.loads(texts["args"][0][1])["fingerprints/train"] == fingerprint

    [records_of_run] = wandb_records(run)
    [wandb_run] = [r["run"] for r in records_of_run if r["type"] == "run"]
    assert wandb_run["display_name"] == "lora-tr-dpo"
    history = wandb_history(records_of_run)
    assert history["train/loss"] == pytest.approx(plain["loss"], rel=0) and history["eval/loss"] == plain["eval_loss"]

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("dpo-pipeline").experiment_id])
    assert mlflow_run.data.params["fingerprints/train"] == fingerprint and mlflow_run.data.params["use_peft"] == "true"
    loss = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "loss")}
    assert loss == plain["loss"] and mlflow_run.info.status == "FINISHED"

    throughput = read_summary(run)["throughput"]
    assert throughput["tokens_per_second"] > 0 and throughput["mfu"] > 0
    assert throughput["peak_source"].startswith("measured")
