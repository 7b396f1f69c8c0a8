"""Torch stays out of the Prefect process: the flows, the config, the plan and the launch of every stage job
import no torch, transformers or DeepSpeed (seconds of start-up and hundreds of MB per flow run otherwise)."""

import json
import subprocess
import sys

from pipeline.config import REPO_ROOT

_DRIVER = """
import json, sys
import flows.pipeline_flow, flows.serve, flows.tasks, flows.report, flows.jobs
from pipeline import launch
from pipeline.config import load_config
from pipeline.plan import Plan
config = load_config(sys.argv[1], {"model_name_or_path": sys.argv[2], "output_dir": sys.argv[3]})
plan = Plan.of(config)
launch.check_launch(config)
for stage in ("tokenize", "reference", "train"):
    launch.stage_command(stage, plan.train_dir / "c.yaml", launch.job_config(config))
print(json.dumps(sorted(m for m in ("torch", "transformers", "deepspeed") if m in sys.modules)))
"""


def test_the_prefect_process_imports_no_torch(tiny_model_dir, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _DRIVER,
            str(REPO_ROOT / "configs" / "default.yaml"),
            str(tiny_model_dir),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
