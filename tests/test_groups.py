"""End to end on the real Docker engine: group jobs give, byte for byte, the files they give
under Snakemake's local executor, run in the same test (issue 8, item 6)."""

import pytest

from conftest import SNAKEMAKE_IMAGE, containers_of, copy_workflow, snakemake
from test_semantics import assert_same_files, local_snakemake

pytestmark = pytest.mark.docker

WITH_SNAKEMAKE = ("--container-image", SNAKEMAKE_IMAGE)
IMAGE_NOTE = "runs as a whole in --container-image"


def both(name, tmp_path, *args, crank_args=()):
    """The workflow under the local executor and under crank, each in its own copy; a
    hang fails the test in two minutes."""
    local_dir = copy_workflow(name, tmp_path / "local")
    crank_dir = copy_workflow(name, tmp_path / "crank")
    local = local_snakemake(local_dir, *args, timeout=120)
    crank = snakemake(crank_dir, *args, *crank_args, timeout=120)
    return local, crank, local_dir, crank_dir


def test_groups_of_shell_rules_as_locally(docker_api, tmp_path):
    """Several rules per group (a chain and parallel branches), --group-components,
    threads and resources per rule, temp files consumed inside the group removed once
    their consumers finished (before the group's next job), one needed outside kept."""
    local, crank, local_dir, crank_dir = both(
        "groups_plain", tmp_path, "--group-components", "comp=3", crank_args=WITH_SNAKEMAKE
    )
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr[-3000:]
    assert_same_files(local_dir, crank_dir)
    assert (crank_dir / "g/joined.txt").read_text() == (
        "start\nleft threads=2 mem=50\nstart\nright\n"
        "g/start.txt removed\ng/shared.txt kept\n"
    )
    # the three components ran as one group job, each rule directly in its image
    assert crank.stderr.count("Group job") >= 1
    assert IMAGE_NOTE not in crank.stderr
    assert containers_of(docker_api, crank_dir) == []


def test_pipe_group_runs_at_once_through_a_fifo(docker_api, tmp_path):
    """The producer and the consumer of a pipe() run at the same time and the pipe is a
    FIFO, as locally (more than a pipe buffer flows through it); the user is told in one
    line that the group's rules run in --container-image."""
    local, crank, local_dir, crank_dir = both("groups_pipe", tmp_path, crank_args=WITH_SNAKEMAKE)
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr[-3000:]
    assert_same_files(local_dir, crank_dir)
    assert (crank_dir / "piped/kind.txt").read_text() == "fifo\n"
    assert (crank_dir / "piped/count.txt").read_text() == "20000\n"
    notes = [line for line in crank.stderr.splitlines() if IMAGE_NOTE in line]
    assert len(notes) == 1, crank.stderr[-3000:]
    assert "rule consume (not crank-test/busybox:1)" in notes[0]
    assert "rule produce (not crank-test/busybox:1)" in notes[0]
    assert containers_of(docker_api, crank_dir) == []


def test_service_group_does_not_hang(docker_api, tmp_path):
    """A service() job serves its consumer in the same group and is stopped once the
    consumer finished, as locally (it used to wait forever)."""
    local, crank, local_dir, crank_dir = both(
        "groups_service", tmp_path, crank_args=WITH_SNAKEMAKE
    )
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr[-3000:]
    assert_same_files(local_dir, crank_dir)
    assert (crank_dir / "svc/used.txt").read_text() == "served\n"
    assert containers_of(docker_api, crank_dir) == []


def test_a_group_job_that_leaves_no_output_stops_its_group(docker_api, tmp_path):
    """Found by the generated workflows: the job after it ran (and wrote its log) and the
    failure named the wrong rule."""
    local, crank, local_dir, crank_dir = both("groups_missing", tmp_path)
    assert local.returncode != 0 and crank.returncode != 0, crank.stderr[-3000:]
    assert_same_files(local_dir, crank_dir)
    assert not (crank_dir / "logs/b.log").exists()
    assert "rule a (job" in crank.stderr and "ended without its output" in crank.stderr
    assert containers_of(docker_api, crank_dir) == []
