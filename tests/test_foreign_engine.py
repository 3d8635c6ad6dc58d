"""A Docker engine that cannot see the workdir (issue 33): one that stands for another
machine, in its own mount and network namespaces with a /tmp of its own. crank must never
run a job on that machine's files, and must say why the job did not run."""

import shutil
import uuid

import pytest

import services
from conftest import snakemake_command

pytestmark = pytest.mark.docker

SNAKEFILE = """
rule copy:
    input: "in.txt"
    output: "out.txt"
    shell: "cat {input} > {output}"
"""


@pytest.fixture(scope="module")
def foreign(docker_api):
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("no unshare or nsenter (util-linux)")
    root = f"/run/crank-f-{uuid.uuid4().hex[:8]}"
    try:
        with services.ForeignEngine(root).running() as engine:
            yield engine
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_on(engine, workdir, *args):
    import subprocess

    return subprocess.run(snakemake_command("--crank-docker-url", engine.url, "--crank-docker-network", "none",
                                            *args), cwd=workdir, capture_output=True, text=True, timeout=300)


def workflow(tmp_path):
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    (workdir / "in.txt").write_text("the client's input\n")
    return workdir


@pytest.mark.parametrize("warm", ["yes", "no"])
def test_a_workdir_the_engine_does_not_have_is_refused_with_why(foreign, tmp_path, warm):
    workdir = workflow(tmp_path)
    done = run_on(foreign, workdir, "--crank-docker-warm", warm)
    assert done.returncode != 0 and not (workdir / "out.txt").exists()
    assert "Traceback" not in done.stderr
    assert f"The engine at {foreign.url} does not have that path of this machine" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("warm", ["yes", "no"])
def test_the_same_path_on_the_engines_host_is_left_alone(foreign, tmp_path, warm):
    """The engine's host has a directory at the workdir's path with other files: the job must
    not read its in.txt nor write its out.txt there."""
    workdir = workflow(tmp_path)
    foreign.run_there(f"mkdir -p {workdir} && echo 'input on the engine host' > {workdir}/in.txt")
    done = run_on(foreign, workdir, "--crank-docker-warm", warm)
    assert done.returncode != 0 and not (workdir / "out.txt").exists()
    assert "Traceback" not in done.stderr
    assert (f"the job did not run: the Docker engine at {foreign.url} does not see this machine's "
            f"{workdir}") in done.stderr, done.stderr[-3000:]
    assert foreign.run_there(f"ls -A {workdir}; cat {workdir}/in.txt") == "in.txt\ninput on the engine host\n"
