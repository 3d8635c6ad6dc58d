"""End to end on the real Docker engine (and Funnel): a workflow gives, byte for byte, the
files it gives under Snakemake's local executor, run in the same test (issues 8 and 22)."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.rounds import Rounds
from snakemake_executor_plugin_crank.task import Resources, State, TaskResult, TaskSpec

from conftest import SNAKEMAKE_IMAGE, containers_of, copy_workflow, snakemake

pytestmark = pytest.mark.docker


def local_snakemake(
    workdir: Path, *args: str, cores: int = 2, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The same workflow under Snakemake's local executor."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", str(cores), *args],
        cwd=workdir, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
    )


def tree(root: Path, skip=()) -> dict:
    """Every path under root (but .snakemake) -> its type, write bits and content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.split(os.sep)[0] == ".snakemake":
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel.split(os.sep)[0] == ".snakemake" or rel in skip:
                continue
            mode = path.lstat().st_mode
            writable = bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            if stat.S_ISDIR(mode):
                found[rel] = ("dir", writable)
            elif stat.S_ISFIFO(mode):
                found[rel] = ("fifo", writable)
            else:
                found[rel] = ("file", writable, path.read_bytes())
    return found


def both(name: str, tmp_path: Path, *args: str, crank_args=(), cores: int = 2, crank=snakemake):
    """Run the workflow under the local executor and under crank (``crank(workdir, *args)``
    runs it on a backend), each in its own copy."""
    local_dir = copy_workflow(name, tmp_path / "local")
    crank_dir = copy_workflow(name, tmp_path / "crank")
    local = local_snakemake(local_dir, *args, cores=cores)
    crank = crank(crank_dir, *args, *crank_args)
    return local, crank, local_dir, crank_dir


def assert_same_files(local_dir: Path, crank_dir: Path, skip=()):
    local, crank = tree(local_dir, skip), tree(crank_dir, skip)
    assert sorted(crank) == sorted(local)
    for rel in local:
        assert crank[rel] == local[rel], rel


# ------------------------------------------------------------------ the command itself


def test_modules_config_and_names_as_locally(docker_api, tmp_path):
    """Item 1 and the root cause: the command is formatted in the rule's own module
    (module config, module-level names, nested modules, params built from them),
    with --config applied, {resources.tmpdir} the container's, `name` not shadowed."""
    local, crank, local_dir, crank_dir = both(
        "semantics_modules", tmp_path, "--config", "who=cli"
    )
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr
    assert_same_files(local_dir, crank_dir)
    # the values that were wrong when the displayed command ran
    read = lambda rel: (crank_dir / rel).read_text()
    assert read("name.txt") == "workflow-variable name_var main-greeting\n"
    assert read("m/out/config.txt") == "{greeting: module-greeting, who: cli}\n"
    assert read("m/out/branch.txt") == "yes\n"
    assert read("m/n/nested.txt") == "x nested\n"
    assert read("tmpdir.txt") == "tmp\n"
    assert containers_of(docker_api, crank_dir) == []


# ------------------------------------------------------------------ shell settings (item 7)

SHELL_ARGS = (
    "--retries", "1", "--set-threads", "res=2",
    "--set-resources", "res:mem_mb=70", "res:foo=3",
    "--default-resources", "mem_mb=30", "disk_mb=7",
)


def test_shell_settings_and_resource_overrides_as_locally(docker_api, tmp_path):
    local, crank, local_dir, crank_dir = both("semantics_shell", tmp_path, *SHELL_ARGS)
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr
    # the host's own cgroup limit is not the container's: compared below instead
    assert_same_files(local_dir, crank_dir, skip={"logs/retry_limit.txt"})
    read = lambda rel: (crank_dir / rel).read_text()
    assert read("prefix.txt") == "from-prefix bash\nsuffix-ran\n"
    assert read("notstrict.txt") == "after-false\nsuffix-ran\n"
    assert read("res.txt") == "threads=2 mem=70 foo=3 disk=7\nsuffix-ran\n"
    # the second attempt ran with the second attempt's limit
    assert read("retry.txt") == "mem=200\nsuffix-ran\n"
    limit = int(read("logs/retry_limit.txt"))  # the engine rounds down to whole pages
    assert any(0 <= mb - limit < 4096 for mb in (200 * 10**6, 200 * 2**20)), limit
    assert containers_of(docker_api, crank_dir) == []


def test_shell_executable_as_locally(docker_api, tmp_path):
    local, crank, local_dir, crank_dir = both("semantics_executable", tmp_path)
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr
    assert_same_files(local_dir, crank_dir)
    assert (crank_dir / "which.txt").read_text() == "sh:none\n"


# ------------------------------------------------------------------ threads (item 4)


def test_threads_and_zero_resources_as_locally(docker_api, tmp_path):
    """threads above the engine's CPUs give what --cores set to those CPUs gives locally,
    threads: 0 and mem_mb=0 are accepted; the cap is reported once per rule."""
    cpus = docker_api.info()["NCPU"]
    local, crank, local_dir, crank_dir = both(
        "semantics_threads", tmp_path, "--default-resources", "mem_mb=0",
        crank_args=("--container-image", SNAKEMAKE_IMAGE), cores=cpus,
    )
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr
    assert_same_files(local_dir, crank_dir)
    for n in (1, 2):
        assert (crank_dir / f"many_{n}.txt").read_text() == f"{cpus} {cpus} {cpus} {cpus}\n"
    assert (crank_dir / "zero.txt").read_text() == "0 0\n"
    for rule in ("many", "many_run"):
        warned = [line for line in crank.stderr.splitlines() if f"rule {rule} asks for 64" in line]
        assert len(warned) == 1, crank.stderr
    assert containers_of(docker_api, crank_dir) == []


def test_threads_capped_at_the_cores_given_as_locally(crank, tmp_path):
    """Issue 22, item 1: with --cores above the engine's CPUs, {threads} and the thread
    variables are the rule's threads capped at --cores, as locally; the container's CPU
    quota stays within what the engine has."""
    local, done, local_dir, crank_dir = both(
        "semantics_cores", tmp_path, cores=5, crank_args=("--cores", "5"), crank=crank.run
    )
    assert local.returncode == 0, local.stderr
    assert done.returncode == 0, done.stderr
    # the host's own cgroup quota is not the container's: checked below instead
    assert_same_files(local_dir, crank_dir, skip={"logs/five_quota.txt"})
    read = lambda rel: (crank_dir / rel).read_text()
    assert read("five.txt") == "5 5 5 5 5 5 5\n"
    assert read("eight.txt") == "5 5\n"
    assert read("three.txt") == "3\n"
    if crank.backend == "docker":
        cpus = crank.api.info()["NCPU"]
        assert cpus < 5, "the test needs an engine with fewer than 5 CPUs"
        quota, period = read("logs/five_quota.txt").split()[:2]  # cgroup v1 or v2
        assert 0 < int(quota) <= cpus * int(period), (quota, period)
    assert crank.live(crank_dir) == []


def test_gpu_model_of_another_executor_without_gpus_runs_as_locally(crank, tmp_path):
    """Issue 34, item 5: gpu_model="nvidia-tesla-p100" and no gpu count asks for no GPU; the
    job runs and its command reads the string, as locally."""
    local, done, local_dir, crank_dir = both("semantics_gpu_model", tmp_path, crank=crank.run)
    assert local.returncode == 0, local.stderr
    assert done.returncode == 0, done.stderr
    assert_same_files(local_dir, crank_dir)
    assert (crank_dir / "model.txt").read_text() == "nvidia-tesla-p100\n"


FROM_INPUT = (
    "--default-resources", "mem_mb=max(2*input.size, 1000.1)", "disk_mb=max(2*input.size, 1000.2)"
)


def test_group_jobs_resources_from_inputs_as_locally(crank, tmp_path):
    """Issue 22, item 2: a group's job computes its resources (and command) from an input
    an earlier job of the group wrote, when it starts, as locally."""
    local, done, local_dir, crank_dir = both("semantics_group_inputs", tmp_path, *FROM_INPUT, crank=crank.run)
    assert local.returncode == 0, local.stderr
    assert done.returncode == 0, done.stderr
    # the host's own cgroup limit is not the container's: checked below instead
    assert_same_files(local_dir, crank_dir, skip={"logs/b_limit.txt"})
    read = lambda rel: (crank_dir / rel).read_text()
    assert read("b.txt").endswith("a mem=1200 disk=1200\nb mem=2442 disk=2442\n")
    assert read("c.txt") == "c mem=2484 disk=2484\n"
    assert not (crank_dir / "a.txt").exists()  # temp(), consumed inside the group
    if crank.backend == "docker":
        limit = int(read("logs/b_limit.txt"))  # the engine rounds down to whole pages
        assert any(0 <= mb - limit < 4096 for mb in (2442 * 10**6, 2442 * 2**20)), limit
    assert crank.live(crank_dir) == []


def instant_task(name):
    return TaskSpec(name=name, label=f"rule {name}", job_id=name, attempt=1, image="i",
                    script="true", workdir="/w", resources=Resources(), log_dir="/w/logs")


class InstantBackend:
    """Every task has finished by the next round."""

    def __init__(self):
        self.submitted = []

    def submit(self, task):
        self.submitted.append(task.name)
        return task.name

    def poll(self, handles):
        return {h: State.FINISHED for h in handles}

    def result(self, handle, task):
        return TaskResult(ok=True)


def test_a_groups_later_tasks_are_handed_down_in_the_round_the_tasks_before_them_succeed():
    """A chain whose tasks so far succeeded waits for its next ones: the round says so,
    submits nothing for it, and the tasks handed down (``extend``) start in that round; a
    chain that waits is listed again until it gets them."""
    backend = InstantBackend()
    rounds = Rounds(backend)
    chain = rounds.start([instant_task("a")], to_come=2)
    done = rounds.step([chain])
    assert done.ended == {} and done.waiting == [chain] and backend.submitted == ["a"]
    assert rounds.step([chain]).waiting == [chain] and backend.submitted == ["a"]
    assert rounds.extend(chain, [instant_task("b1"), instant_task("b2")]) is None
    assert backend.submitted == ["a", "b1"]
    done = rounds.step([chain])
    assert done.waiting == [] and backend.submitted == ["a", "b1", "b2"]
    assert rounds.step([chain]).waiting == [chain]
    outcome = rounds.failed(chain, "rule c: cannot evaluate its params or resources: why")
    assert not outcome.ok
    assert outcome.message == "rule c: cannot evaluate its params or resources: why"
    assert [a.task.name for a in outcome.attempts] == ["a", "b1", "b2"]


def test_the_tasks_that_succeed_are_reported_with_the_round_not_to_the_caller():
    """The rounds call nothing of their caller: each round returns the tasks that
    succeeded in it with their results, and the chains that wait for their next tasks."""

    class Timed(InstantBackend):
        def result(self, handle, task):
            return TaskResult(ok=True, seconds=float(len(task.name)), reason=f"{task.name} ok")

    backend = Timed()
    rounds = Rounds(backend)
    chain = rounds.start([instant_task("a")], to_come=1)
    done = rounds.step([chain])
    assert done.ended == {} and done.waiting == [chain]
    assert [(t.name, r.seconds, r.reason) for t, r in done.succeeded[chain]] == [("a", 1.0, "a ok")]
    rounds.extend(chain, [instant_task("bb")])
    done = rounds.step([chain])
    assert done.ended[chain].ok and done.waiting == []
    assert [(t.name, r.seconds) for t, r in done.succeeded[chain]] == [("bb", 2.0)]


# ------------------------------------------------------------------ long commands (item 5)


def test_command_longer_than_one_argument_runs_as_locally(docker_api, tmp_path):
    local, crank, local_dir, crank_dir = both("semantics_long", tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    assert crank.returncode == 0, crank.stderr[-3000:]
    assert_same_files(local_dir, crank_dir)
    assert len((crank_dir / "long.txt").read_bytes()) > 200_000
    # the script files are gone with the run
    assert not list((crank_dir / ".snakemake" / "crank").glob("scripts/*/*"))
    assert containers_of(docker_api, crank_dir) == []


# ------------------------------------------------------------------ after a job (item 2)


def test_files_snakemake_makes_after_a_job_as_locally(docker_api, tmp_path):
    local, crank, local_dir, crank_dir = both(
        "semantics_after", tmp_path, crank_args=("--container-image", SNAKEMAKE_IMAGE)
    )
    assert local.returncode == 0, local.stderr
    assert crank.returncode == 0, crank.stderr
    # running times differ: the benchmark files are compared by their rows
    benchmarks = {"bench/shadowed.tsv", "bench/repeated.tsv"}
    assert_same_files(local_dir, crank_dir, skip=benchmarks)
    for rel in benchmarks:
        ours = (crank_dir / rel).read_text().splitlines()
        theirs = (local_dir / rel).read_text().splitlines()
        assert len(ours) == len(theirs) and ours[0] == theirs[0], rel
    assert len((crank_dir / "bench/repeated.tsv").read_text().splitlines()) == 4
    assert (crank_dir / "repeated.txt").read_text() == "iteration 0\niteration 1\niteration 2\n"
    assert (crank_dir / "logs/quiet.log").read_text() == ""
    assert not os.access(crank_dir / "prot.txt", os.W_OK) or os.geteuid() == 0
    assert not (crank_dir / "prot.txt").stat().st_mode & 0o222
    assert containers_of(docker_api, crank_dir) == []


# ------------------------------------------------------------------ checks (item 3)


def test_output_checks_fail_the_job_as_locally(docker_api, tmp_path):
    local, crank, local_dir, crank_dir = both("semantics_checks", tmp_path, "--keep-going", "--forceall")
    assert local.returncode != 0 and crank.returncode != 0
    failed = lambda run: set(re.findall(r"(?:Error|Exception) in rule (\w+)", run.stderr))
    assert failed(local) >= {"empty", "badsum", "notadir", "kept"}, local.stderr
    assert failed(crank) == failed(local), crank.stderr[-3000:]
    assert_same_files(local_dir, crank_dir)
    assert (crank_dir / "kept.txt").read_text() == "before\n"
    assert containers_of(docker_api, crank_dir) == []
