"""The quickstart at CI size, run once per session: the end-to-end test and the accuracy gates
both read it (training happens once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BASELINES = Path(__file__).resolve().parents[2] / "benchmarks" / "baselines.json"


def _ci_settings():
    from imkd_deploy.quickstart import QuickstartSettings

    data = json.loads(BASELINES.read_text())["accuracy"]["quickstart_settings"]
    return QuickstartSettings(**data)


@pytest.fixture(scope="session")
def ci_settings():
    return _ci_settings()


@pytest.fixture(scope="session")
def baselines() -> dict:
    return json.loads(BASELINES.read_text())


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    from imkd_deploy.quickstart import run_quickstart

    workdir = tmp_path_factory.mktemp("quickstart")
    logs: list[str] = []
    result = run_quickstart(workdir, _ci_settings(), log=logs.append, progress=False)
    return result, logs
