"""Serve the pipeline deployment from one process: the alternative to a work pool and a worker.

From the repository root (flow runs start there, as with ``prefect deploy``):

    prefect server start --host 127.0.0.1                           # another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                           # Ctrl-C stops serving
    prefect deployment run dpo-pipeline/dpo-pipeline --watch

It serves the deployment that ``prefect.yaml`` defines (name, description, parameters, cron schedules, the
concurrency limit), read from that file so the definition has one home. Each flow run is a subprocess of this
process, cancellable from the UI or ``prefect flow-run cancel`` like a worker's. Trade-off against ``prefect
deploy`` + a worker: nothing to set up, but runs happen only while this process is alive and on this machine.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.schedules import Cron

from flows.pipeline_flow import check_prefect_api, dpo_pipeline
from pipeline.config import REPO_ROOT
from pipeline.errors import PipelineError

PREFECT_FILE = REPO_ROOT / "prefect.yaml"


def pipeline_deployment() -> dict[str, Any]:
    """The ``dpo-pipeline`` deployment entry of ``prefect.yaml``."""
    deployments = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    return next(d for d in deployments if d["entrypoint"].endswith(f":{dpo_pipeline.fn.__name__}"))


def serve() -> None:
    check_prefect_api(server_required=True)  # a temporary API would vanish with this process, runs and all
    spec = pipeline_deployment()
    limit = spec.get("concurrency_limit")
    dpo_pipeline.serve(
        name=spec["name"],
        description=spec.get("description"),
        parameters=spec.get("parameters") or {},
        schedules=[Cron(s["cron"], timezone=s.get("timezone")) for s in spec.get("schedules") or []],
        global_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
    )


def main() -> int:
    try:
        serve()
    except PipelineError as exc:
        print(f"flows.serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
