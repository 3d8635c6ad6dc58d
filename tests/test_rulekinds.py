"""End-to-end: rules that need Snakemake inside the container, on the real Docker engine."""

import pytest

from conftest import BUSYBOX, SNAKEMAKE_IMAGE, containers_of, copy_workflow, snakemake
from snakemake_executor_plugin_crank.adapter.jobs import snakemake_version

pytestmark = pytest.mark.docker


def test_every_rule_kind_runs_with_exact_outputs(docker_api, tmp_path):
    workdir = copy_workflow("rulekinds", tmp_path / "wf")
    # the wrapper prefix lies outside the workdir: crank mounts it like a source
    wrappers = tmp_path / "wrappers"
    (workdir / "wrappers").rename(wrappers)
    args = ("--container-image", SNAKEMAKE_IMAGE, "--wrapper-prefix", f"file://{wrappers}/")
    done = snakemake(workdir, *args)
    assert done.returncode == 0, done.stderr

    def read(name):
        return (workdir / name).read_text()

    run = f"hello from run threads=2 cwd={workdir}\n"
    assert read("run.txt") == run
    script_py = run.upper() + "word=snake threads=1\n"
    assert read("script_py.txt") == script_py
    assert read("logs/script_py.log") == "upper done\n"
    assert read("script_sh.txt") == script_py + "tag=bash\n"
    # checkpoint: the host re-evaluated the DAG from the parts that came back
    assert read("aggregated.txt") == "PART 0\nPART 1\nPART 2\n"
    assert read("grouped/final.txt") == "from-shell\nfrom-run\n"
    assert not (workdir / "grouped" / "intermediate.txt").exists()  # temp() inside the group
    assert not (workdir / "tmp" / "value.txt").exists()  # temp() between jobs
    assert read("consumed.txt") == "42\n"
    assert read("bench_done.txt") == "done\n"
    assert read("benchmarks/bench.tsv").startswith("s\th:m:s\t")
    assert read("wrapped.txt") == "3\n"
    assert read("shadowed.txt") == "shadowed\n"
    assert not (workdir / "scratch.txt").exists()  # stayed in the shadow directory
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
