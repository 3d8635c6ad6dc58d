"""The status rounds' own logic (wall time, tolerance) with a fake backend and clock: no
Snakemake, no engine, no sleeping; then the rounds on the real backends, a wall-time kill or
cancel refused through the fault proxy; then a job's wall time through Snakemake."""

import os
import uuid

import pytest

from snakemake_executor_plugin_crank.backends.docker import DockerBackend
from snakemake_executor_plugin_crank.backends.docker.engine import DockerOptions
from snakemake_executor_plugin_crank.backends.tes.backend import TesOptions
from snakemake_executor_plugin_crank.backends.tes.opening import open_tes_backend
from snakemake_executor_plugin_crank.errors import BackendUnavailable, CrankError
from snakemake_executor_plugin_crank.rounds import RoundFailed, Rounds
from snakemake_executor_plugin_crank.task import Adopted, Resources, State, TaskResult, TaskSpec

from conftest import BUSYBOX, containers_of, copy_workflow, rounds_until_ended, snakemake


class FakeBackend:
    """One task that runs until it is stopped; ``stop_errors`` are raised by the first stops."""

    def __init__(self, stop_errors=()):
        self.stop_errors = list(stop_errors)
        self.stops = 0
        self.state = State.RUNNING

    def submit(self, task):
        return "h1"

    def poll(self, handles):
        return {h: self.state for h in handles}

    def stop(self, handle):
        self.stops += 1
        if self.stop_errors:
            raise self.stop_errors.pop(0)
        self.state = State.FINISHED

    def result(self, handle, task):
        return TaskResult(ok=False, exit_code=137)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_rounds_status_request_failing_is_given_up_after_the_tolerance_once_in_a_row():
    """One clock, the rounds': a round that answers starts it again."""
    backend, clock = FakeBackend(), Clock()
    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i", script=":",
                    workdir="/w", log_dir="/w/logs")
    rounds = Rounds(backend, clock=clock, tolerance_s=60)
    chain = rounds.start([task])
    answer = backend.poll

    def failing(handles):
        raise BackendUnavailable("no answer")

    backend.poll = failing
    seen = []
    for now in (0, 59, 100):
        clock.now = now
        with pytest.raises(RoundFailed) as failed:
            rounds.step([chain])
        seen.append((failed.value.failing_for, failed.value.given_up))
    assert seen == [(0, False), (59, False), (100, True)]
    backend.poll = answer
    rounds.step([chain])
    backend.poll = failing
    clock.now = 200
    with pytest.raises(RoundFailed) as failed:
        rounds.step([chain])
    assert (failed.value.failing_for, failed.value.given_up) == (0, False)


def run_rounds(stop_errors, count, tolerance_s=120.0):
    backend, clock = FakeBackend(stop_errors), Clock()
    task = TaskSpec(name="slow", label="rule slow", job_id="1", attempt=1, image="i",
                    script="sleep 600", workdir="/w", resources=Resources(runtime_s=60),
                    log_dir="/w/logs")
    rounds = Rounds(backend, clock=clock, tolerance_s=tolerance_s)
    chain = rounds.start([task])
    rounds.step([chain])  # seen running: its wall time starts
    outcomes = []
    for _ in range(count):
        clock.now += 61
        outcomes.append(rounds.step([chain]).ended.get(chain))
    return backend, outcomes


def test_a_wall_time_stop_that_fails_is_tried_again_next_round():
    backend, outcomes = run_rounds([BackendUnavailable("the engine did not answer")], 3)
    assert backend.stops == 2  # the failed stop, then the one that worked; no more
    assert outcomes[0] is None and outcomes[1] is None  # stopped, not yet collected
    assert not outcomes[2].ok
    assert "wall time exceeded (runtime limit 1 min)" in outcomes[2].message


def test_a_wall_time_stop_failing_past_the_tolerance_fails_the_job():
    unavailable = BackendUnavailable("the engine did not answer")
    backend, outcomes = run_rounds([unavailable] * 5, 3, tolerance_s=100)
    assert backend.stops == 3
    assert outcomes[:2] == [None, None]
    assert not outcomes[2].ok
    assert outcomes[2].message == (
        "rule slow: wall time exceeded (runtime limit 1 min); the backend failed "
        "(the engine did not answer)"
    )


def test_a_task_preempted_after_its_wall_time_is_not_run_again():
    backend, clock = FakeBackend(), Clock()
    task = TaskSpec(name="slow", label="rule slow", job_id="1", attempt=1, image="i",
                    script="sleep 600", workdir="/w",
                    resources=Resources(runtime_s=60, preemptible=True), log_dir="/w/logs")
    rounds = Rounds(backend, clock=clock, preemptible_retries=3)
    chain = rounds.start([task])
    rounds.step([chain])
    backend.stop_errors = [BackendUnavailable("the server did not answer")]
    clock.now += 61
    assert rounds.step([chain]).ended == {}  # over its wall time; the stop failed
    backend.state = State.PREEMPTED  # reclaimed before the stop went through
    clock.now += 1
    outcome = rounds.step([chain]).ended[chain]
    assert not outcome.ok and "wall time exceeded" in outcome.message
    assert chain.preemptions == 0


def test_a_wall_time_stop_refused_fails_the_job_with_the_reason():
    backend, outcomes = run_rounds([CrankError("the TES server refused to cancel task t")], 1)
    assert backend.stops == 1
    assert outcomes[0].message == (
        "rule slow: wall time exceeded (runtime limit 1 min); crank could not stop it: "
        "the TES server refused to cancel task t"
    )


# ---------------------------------------------------------------- end to end


def refusing_the_first_two(suffix: str, refused: list):
    """A fault-proxy rule: the first two requests whose path ends with ``suffix`` are refused
    (noted in ``refused``), as by a backend that does not answer at that moment."""

    def rule(method, path):
        if path.endswith(suffix) and len(refused) < 2:
            refused.append(path)
            return "refuse"
        return "pass"

    return rule


def walltime_task(workdir):
    """A task past its 3 s runtime within a second: the rounds must kill it."""
    return TaskSpec(name="walltime", label="rule walltime", job_id="1", attempt=1, image=BUSYBOX,
                    script="echo started >&2; sleep 600", workdir=str(workdir),
                    resources=Resources(runtime_s=3), log_dir=str(workdir / "logs"))


@pytest.mark.docker
def test_a_wall_time_kill_the_engine_refuses_is_tried_again(docker_api, tmp_path):
    """The engine drops the first two kills of a task past its runtime (a moment it does
    not answer): the rounds kill it at a later round and report the wall time, with the
    stderr's tail of the killed task; no container is left."""
    from faultproxy import FaultProxy

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip("the fault proxy needs the engine on a Unix socket")
    refused = []
    with FaultProxy(str(tmp_path / "p.sock"), host[len("unix://"):]) as proxy:
        proxy.set_rule(refusing_the_first_two("/kill", refused))
        backend = DockerBackend(uuid.uuid4().hex, str(tmp_path), DockerOptions(base_url=proxy.url))
        try:
            outcome, _ = rounds_until_ended(backend, walltime_task(tmp_path), 90)
        finally:
            backend.close()
    assert len(refused) == 2
    assert not outcome.ok
    assert "wall time exceeded (runtime limit 3 s)" in outcome.message, outcome.message
    assert "started" in outcome.message, outcome.message  # the stderr tail of the killed task
    assert containers_of(docker_api, tmp_path) == []


@pytest.mark.slow
@pytest.mark.docker
def test_a_job_past_its_runtime_fails_with_the_wall_time_through_snakemake(docker_api, tmp_path):
    """A rule's runtime (whole minutes in Snakemake: 1) ends its job at 1 min, not at the end
    of its sleep 600; Snakemake's message says why, with the stderr's tail; no container is
    left."""
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "walltime")
    assert done.returncode != 0
    assert "wall time exceeded (runtime limit 1 min)" in done.stderr, done.stderr[-3000:]
    assert "started" in done.stderr  # the stderr tail of the killed task
    assert containers_of(docker_api, workdir) == []


@pytest.mark.tes
def test_a_wall_time_cancel_the_tes_server_refuses_is_tried_again(aws_env, tmp_path):
    """The same on TES, where the runtime limit is what ends a task Funnel leaves RUNNING."""
    from conftest import proxy_to, tasks_of

    refused = []
    with proxy_to(aws_env) as proxy:
        proxy.set_rule(refusing_the_first_two(":cancel", refused))
        backend = open_tes_backend(uuid.uuid4().hex, str(tmp_path),
                                   TesOptions(url=proxy.url, storage_prefix=aws_env.prefix(uuid.uuid4().hex)))
        try:
            outcome, _ = rounds_until_ended(backend, walltime_task(tmp_path), 90)
        finally:
            backend.close()
    assert len(refused) == 2
    assert not outcome.ok
    assert "wall time exceeded (runtime limit 3 s)" in outcome.message, outcome.message
    [task] = tasks_of(aws_env, tmp_path)
    assert task["state"] in ("CANCELED", "CANCELING"), task["state"]


def test_an_interrupted_task_runs_again_once_then_fails():
    backend, clock = FakeBackend(), Clock()
    submitted = []
    backend.submit = lambda task: submitted.append(task) or f"h{len(submitted)}"
    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i",
                    script="true", workdir="/w", log_dir="/w/logs")
    rounds = Rounds(backend, clock=clock)
    chain = rounds.start([task])
    backend.state = State.INTERRUPTED  # e.g. the engine restarted under it
    assert rounds.step([chain]).ended == {}
    assert len(submitted) == 2 and chain.handle == "h2" and chain.spent == ["h1"]
    outcome = rounds.step([chain]).ended[chain]  # interrupted again: reported this time
    assert not outcome.ok and len(submitted) == 2


def test_an_adopted_task_is_followed_not_submitted():
    backend = FakeBackend()
    backend.submit = lambda task: pytest.fail("submitted")
    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i",
                    script="true", workdir="/w", log_dir="/w/logs")
    chain = Rounds(backend).start([task], adopted=Adopted("theirs"))
    assert chain.handle == "theirs"


def test_an_adopted_tasks_wall_time_counts_from_its_start_not_from_the_adoption():
    backend, clock = FakeBackend(), Clock()
    task = TaskSpec(name="slow", label="rule slow", job_id="1", attempt=1, image="i",
                    script="sleep 600", workdir="/w", resources=Resources(runtime_s=60),
                    log_dir="/w/logs")
    rounds = Rounds(backend, clock=clock)
    chain = rounds.start([task], adopted=Adopted("theirs", ran_s=50))
    assert rounds.step([chain]).ended == {}
    clock.now += 11  # 61 s since it started, 11 s since it was adopted
    assert rounds.step([chain]).ended == {} and backend.stops == 1
    outcome = rounds.step([chain]).ended[chain]
    assert not outcome.ok and "wall time exceeded (runtime limit 1 min)" in outcome.message


@pytest.mark.parametrize("seconds, shown", [(60, "1 min"), (30, "30 s"), (90, "1 min 30 s"), (7200, "120 min")])
def test_the_wall_time_message_says_the_limit_as_asked(seconds, shown):
    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i", script="true",
                    workdir="/w", resources=Resources(runtime_s=seconds), log_dir="/w/logs")
    assert Rounds._wall_time(task) == f"wall time exceeded (runtime limit {shown})"
