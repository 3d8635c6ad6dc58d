"""A status round on the real Docker engine never loses an outcome: an engine error while
handling one chain affects that chain only."""

import uuid

import pytest
import requests

from snakemake_executor_plugin_crank.backends.docker import DockerBackend
from snakemake_executor_plugin_crank.rounds import Rounds
from snakemake_executor_plugin_crank.task import Resources, TaskSpec

from conftest import BUSYBOX, wait_for

pytestmark = pytest.mark.docker


def _task(tmp_path, name, script):
    return TaskSpec(name=name, label=f"rule {name}", job_id=name, attempt=1, image=BUSYBOX,
                    script=script, workdir=str(tmp_path), resources=Resources(),
                    log_dir=str(tmp_path / "logs"))


def test_engine_error_in_one_chain_keeps_the_outcome_of_another(docker_api, tmp_path):
    backend = DockerBackend(uuid.uuid4().hex, str(tmp_path))
    rounds = Rounds(backend)
    single = rounds.start([_task(tmp_path, "single", "true")])
    group = rounds.start([_task(tmp_path, "first", "true"), _task(tmp_path, "second", "true")])
    wait_for(lambda: all(row["State"] == "exited" for row in docker_api.containers(
        all=True, filters={"label": f"crank.run={backend.run_id}"})), 30, "both tasks to end")

    # the engine drops the connection when the group's second task is created
    create = backend.api.create_container
    calls = []

    def flaky_create(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise requests.ConnectionError("connection reset by the engine")
        return create(*args, **kwargs)

    backend.api.create_container = flaky_create
    outcomes = {}
    try:
        def settled():
            try:
                ended = rounds.step([c for c in (single, group) if c not in outcomes]).ended
            except requests.ConnectionError:
                return False  # a failed round: try again
            for chain, outcome in ended.items():
                outcomes[chain] = outcome
                rounds.release(chain)
            return len(outcomes) == 2

        wait_for(settled, 30, "both chains to end")
    finally:
        backend.close()
    assert outcomes[single].ok, outcomes[single].message
    assert outcomes[group].ok, outcomes[group].message
    assert len(calls) == 2  # the group's second task was submitted again, once
    assert docker_api.containers(all=True, filters={"label": f"crank.run={backend.run_id}"}) == []
