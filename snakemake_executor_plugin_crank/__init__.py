"""crank: every Snakemake job becomes a container task on a Docker engine.

This module only wires the parts: settings -> backend, jobs -> tasks, runner -> reports.
"""

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import AsyncGenerator, List, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import (
    CommonSettings,
    DeploymentMethod,
    ExecutorSettingsBase,
)

from . import jobs
from .runner import Runner
from .task import CrankError


# consecutive status rounds that may fail (engine restarting, network blip) before
# the active jobs are reported as failed
MAX_FAILED_ROUNDS = 10
IDLE_INTERVAL = 0.1


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    backend: str = field(
        default="docker",
        metadata={
            "help": "Where tasks run: 'docker' (a Docker engine) or 'tes' (a GA4GH TES "
            "server; not available yet).",
            "env_var": True,
            "choices": ["docker", "tes"],
        },
    )
    default_image: Optional[str] = field(
        default=None,
        metadata={
            "help": "Image for shell: rules that have no container: directive. "
            "Default: Snakemake's --container-image.",
            "env_var": True,
        },
    )
    clamp_resources: bool = field(
        default=False,
        metadata={
            "help": "Lower threads or mem_mb requests that exceed the engine's CPUs or "
            "memory to what it has, with a warning, instead of failing the job.",
            "env_var": True,
        },
    )
    docker_url: Optional[str] = field(
        default=None,
        metadata={
            "help": "Docker engine to use, e.g. unix:///var/run/docker.sock or "
            "tcp://host:2375 (plain HTTP; for TLS set DOCKER_HOST, DOCKER_TLS_VERIFY and "
            "DOCKER_CERT_PATH instead). Default: DOCKER_HOST, then the local socket. The "
            "engine must see the workflow at the same paths.",
            "env_var": True,
        },
    )
    docker_network: str = field(
        default="bridge",
        metadata={
            "help": "Network mode of the containers: 'bridge' (Docker's default), "
            "'none' (no network), 'host', or the name of a Docker network.",
            "env_var": True,
        },
    )
    docker_pull: str = field(
        default="missing",
        metadata={
            "help": "When to pull an image: 'missing' (only when the engine lacks it), "
            "'always', or 'never'.",
            "env_var": True,
            "choices": ["missing", "always", "never"],
        },
    )
    docker_host_config: Optional[str] = field(
        default=None,
        metadata={
            "help": "Extra container options as a JSON object of Docker SDK host-config "
            'arguments, e.g. \'{"shm_size": "1g", "cap_add": ["SYS_PTRACE"]}\'. '
            "They override crank's own (mounts, limits, network).",
            "env_var": True,
        },
    )


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=True,
    job_deploy_sources=False,
    pass_default_storage_provider_args=False,
    # declared --envvars go into the container's environment, not into a logged command
    pass_envvar_declarations_to_cmd=False,
    auto_deploy_default_storage_provider=False,
    can_transfer_local_files=True,
)


def _host_config(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CrankError(f"--crank-docker-host-config is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CrankError("--crank-docker-host-config must be a JSON object")
    return value


def _backend(settings: ExecutorSettings, run_id: str, workdir: str):
    if settings.backend == "tes":
        raise CrankError(
            "--crank-backend tes is not available in this version of crank; "
            "use --crank-backend docker"
        )
    from .backends.docker import DockerBackend, DockerOptions

    options = DockerOptions(
        base_url=settings.docker_url,
        network=settings.docker_network,
        pull=settings.docker_pull,
        host_config=_host_config(settings.docker_host_config),
    )
    return DockerBackend(run_id, workdir, options)


class Executor(RemoteExecutor):
    def __post_init__(self):
        settings = self.workflow.executor_settings or ExecutorSettings()
        self.run_id = uuid.uuid4().hex
        workdir = os.getcwd()
        try:
            self.backend = _backend(settings, self.run_id, workdir)
        except CrankError as e:
            raise WorkflowError(str(e)) from None
        removed = self.backend.remove_orphans()
        if removed:
            self.logger.info(f"crank: removed {removed} container(s) left by an earlier run")
        self.runner = Runner(self.backend, on_success=self._task_succeeded)
        self._failed_rounds = 0
        self._warned = set()
        remote = self.workflow.remote_execution_settings
        self.context = jobs.JobContext(
            workdir=workdir,
            log_dir=os.path.join(workdir, ".snakemake", "crank", "logs", self.run_id),
            default_image=settings.default_image or remote.container_image,
            snakemake_image=remote.container_image,
            snakemake_version=jobs.snakemake_version(),
            job_command=self.format_job_exec,
            sources=jobs.workflow_sources(self.workflow),
            use_conda=DeploymentMethod.CONDA
            in self.workflow.deployment_settings.deployment_method,
            envvars=self.envvars(),
            is_preemptible=remote.preemptible_rules.is_preemptible,
            capacity=self.backend.capacity(),
            clamp=settings.clamp_resources,
            warn=self._warn_once,
        )

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self.logger.warning(f"crank: {message}")

    def run_job(self, job: JobExecutorInterface):
        try:
            tasks = jobs.tasks_for(job, self.context)
            jobs.prepare_outputs(job, self.workflow.async_run)
            chain = self.runner.start(tasks)
        except CrankError as e:
            self._report_error(SubmittedJobInfo(job), f"{e}\n")
            return
        self.report_job_submission(
            SubmittedJobInfo(job, external_jobid=chain.handle, aux={"chain": chain})
        )

    async def check_active_jobs(
        self, active_jobs: List[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        if not active_jobs:
            # nothing to ask the backend; look again soon so new jobs are seen early
            # (this also covers the first round, which can come before __post_init__)
            self.next_seconds_between_status_checks = IDLE_INTERVAL
            return
        chains = [info.aux["chain"] for info in active_jobs]
        try:
            async with self.status_rate_limiter:
                ended = self.runner.step(chains)
            self._failed_rounds = 0
        except Exception as e:
            self._failed_rounds += 1
            if self._failed_rounds < MAX_FAILED_ROUNDS:
                self.logger.warning(f"crank: status check failed, will retry: {e}")
                for info in active_jobs:
                    yield info
                return
            message = f"crank lost the backend ({e}); the task's state is unknown\n"
            for info in active_jobs:
                self._report_error(info, message)
            return
        for info in active_jobs:
            outcome = ended.get(info.aux["chain"])
            if outcome is None:
                yield info
            elif outcome.ok:
                self.report_job_success(info)
            else:
                self._report_error(info, outcome.message, outcome.log_files)
        still = [c for c in chains if c not in ended]
        self.next_seconds_between_status_checks = Runner.next_interval(
            still,
            self.runner.clock(),
            self.workflow.remote_execution_settings.seconds_between_status_checks,
        )

    def _task_succeeded(self, task, result) -> None:
        if task.benchmark:
            jobs.write_benchmark(task.benchmark, result.seconds)

    def _report_error(self, info: SubmittedJobInfo, message: str, logs=()) -> None:
        if info.job.is_group():
            # Snakemake does not print the message of a failed group job
            self.logger.error(message.rstrip())
        self.report_job_error(info, msg=message, aux_logs=list(logs))

    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]):
        self.runner.cancel([info.aux["chain"] for info in active_jobs])

    def shutdown(self):
        super().shutdown()
        self.backend.close()
