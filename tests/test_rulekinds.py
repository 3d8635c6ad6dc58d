"""End-to-end: rules that need Snakemake inside the container, on the real Docker engine."""

import pytest

from conftest import BUSYBOX, SNAKEMAKE_IMAGE, containers_of, copy_workflow, snakemake
from expectations import assert_rulekinds_outputs, rulekinds_workdir
from snakemake_executor_plugin_crank.adapter.jobs import snakemake_version

pytestmark = pytest.mark.docker


def test_every_rule_kind_runs_with_exact_outputs(docker_api, tmp_path):
    workdir, args = rulekinds_workdir(tmp_path)
    done = snakemake(workdir, *args)
    assert done.returncode == 0, done.stderr
    assert_rulekinds_outputs(workdir)
    assert containers_of(docker_api, workdir) == []

    again = snakemake(workdir, *args)
    assert again.returncode == 0 and "Nothing to be done" in again.stderr


def test_image_without_snakemake_is_named_in_the_error(docker_api, tmp_path):
    workdir = copy_workflow("rulekinds", tmp_path / "wf")
    done = snakemake(workdir, "run_rule", "--container-image", BUSYBOX,
                     "--wrapper-prefix", f"file://{workdir}/wrappers/")
    assert done.returncode != 0
    assert (
        f"crank: image {BUSYBOX} has no Snakemake (python -m snakemake); rule run_rule needs "
        f"an image with Snakemake {snakemake_version()}"
    ) in done.stderr
    assert "Traceback" not in done.stderr


def test_conda_rule_without_conda_in_the_image_is_a_clear_error(docker_api, tmp_path):
    # with --sdm conda a shell rule goes through Snakemake, which deploys the environment
    workdir = copy_workflow("rulekinds", tmp_path / "wf")
    done = snakemake(workdir, "with_conda", "--sdm", "conda", "--container-image", SNAKEMAKE_IMAGE,
                     "--wrapper-prefix", f"file://{workdir}/wrappers/")
    assert done.returncode != 0
    assert "rule with_conda (job" in done.stderr
    assert f"failed in image {SNAKEMAKE_IMAGE}" in done.stderr
    assert "Is conda installed and accessible?" in done.stderr
    assert not (workdir / "conda.txt").exists()
