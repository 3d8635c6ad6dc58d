"""Snakemake's storage layer (``storage()`` files, a default storage provider) and its
between-workflow cache (``--cache``) for crank's jobs.

Snakemake's job command and environment carry the settings of *every* storage plugin
installed on the host; crank narrows them to what a job needs: the image's Snakemake gets
the settings of the plugins the workflow registered (it registers them again when it reads
the Snakefile), and a task gets the secrets (the plugins' environment-variable settings)
only of the plugins its own files use, and only when Snakemake runs in it. A job whose
command runs directly never reaches the storage: the host retrieves its storage inputs
before it runs and stores its outputs after it succeeded, by Snakemake's own storage
objects, as Snakemake's local executor does.

``_get_storage_provider_setting_items`` and ``StorageRegistry._storages`` belong to
Snakemake, not to the plugin interface: that coupling stays in this module.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Collection, Dict, Iterable, Mapping, Optional, Set, Tuple

from snakemake.io import is_flagged, wait_for_files
from snakemake_interface_storage_plugins.registry import StoragePluginRegistry

from .jobs import single_jobs


def _plugin_names(providers: Iterable[Any], workflow: Any) -> Set[str]:
    """The names of the installed plugins these provider instances belong to (a tagged
    provider is registered under its tag, not its plugin's name)."""
    registry = StoragePluginRegistry()
    classes = {
        name: registry.get_plugin(name).storage_provider
        for name in workflow.storage_provider_settings
    }
    return {
        name for provider in providers for name, cls in classes.items() if isinstance(provider, cls)
    }


def registered_plugins(workflow: Any) -> Set[str]:
    """The plugins the workflow registered: its storage() files and storage: directives,
    and the default storage provider."""
    return _plugin_names(workflow.storage_registry._storages.values(), workflow)


def packages(workflow: Any) -> Tuple[Tuple[str, str], ...]:
    """(name, Python package) of each plugin the workflow registered."""
    registry = StoragePluginRegistry()
    return tuple(
        (name, registry.get_plugin_package_name(name)) for name in sorted(registered_plugins(workflow))
    )


def storage_files(job: Any) -> list:
    """The storage() files of a job (or of a group's jobs): inputs, outputs, logs, benchmarks."""
    files = []
    for single in single_jobs(job):
        benchmark = [single.benchmark] if single.benchmark else []
        files += [
            f for f in (*single.input, *single.output, *single.log, *benchmark) if f.is_storage
        ]
    return files


def plugins_of(job: Any, workflow: Any) -> Set[str]:
    """The plugins whose storage a job's own files are in."""
    names = _plugin_names((f.storage_object.provider for f in storage_files(job)), workflow)
    default = workflow.storage_settings.default_storage_provider
    if default:
        names.add(default)
    return names


def job_command(command: str, workflow: Any) -> str:
    """Snakemake's job command (``format_job_exec``) without the settings of storage
    plugins the workflow does not use (the image's Snakemake need not have them, and
    rejects them when it has not), with the default storage provider's settings (crank
    tells Snakemake not to add them: a job run directly needs none)."""
    factory = workflow.spawned_job_args_factory
    wanted = registered_plugins(workflow)
    # get_storage_provider_args formats one argument per non-environment setting, in order
    owners = [
        plugin.name
        for plugin, field, _ in factory._get_storage_provider_setting_items()
        if not field.metadata.get("env_var", False)
    ]
    for owner, arg in zip(owners, factory.get_storage_provider_args()):
        if owner not in wanted:
            command = command.replace(f" {arg} ", " ", 1)
    default = factory.get_default_storage_provider_args()
    return f"{command} {default}" if default else command


def all_secret_names(workflow: Any) -> Set[str]:
    """The environment variables Snakemake would give every job for the storage plugins."""
    return set(workflow.spawned_job_args_factory.get_storage_provider_envvars())


def secrets_for(job: Any, workflow: Any) -> Dict[str, str]:
    """The storage plugins' environment-variable settings (keys, secrets, endpoints) a task
    that runs Snakemake needs: those of the plugins its own files are in."""
    used = plugins_of(job, workflow)
    return {
        plugin.get_envvar(field.name): " ".join(map(str, values))
        for plugin, field, values in
        workflow.spawned_job_args_factory._get_storage_provider_setting_items()
        if field.metadata.get("env_var") and plugin.name in used
    }


def user_envvars(envvars: Mapping[str, str], workflow: Any) -> Dict[str, str]:
    """``envvars`` (Snakemake's, for every job) without the storage plugins' settings,
    unless the user named them in --envvars or the workflow's envvars:."""
    declared = {*workflow.remote_execution_settings.envvars, *workflow.envvars}
    secrets = all_secret_names(workflow)
    return {k: v for k, v in envvars.items() if k in declared or k not in secrets}


def _server_reaches(prefix: Optional[str], endpoint: Optional[str]) -> Callable[[Any], bool]:
    """For a TES server whose tasks reach crank's storage ``prefix`` (at ``endpoint``, for
    S3): whether it reads and writes a storage file's object itself: an object in the
    prefix's bucket (the server uses its own credentials), at the same endpoint."""
    scheme, _, rest = (prefix or "").partition("://")
    if scheme not in ("s3", "gs", "az") or not rest:
        return lambda f: False
    bucket = f"{scheme}://{rest.split('/', 1)[0]}/"
    if scheme == "s3":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    same_endpoint = lambda e: (e or "").rstrip("/") == (endpoint or "").rstrip("/")
    return lambda f: (
        f.is_storage
        and not is_flagged(f, "directory")
        and not f.should_not_be_retrieved_from_storage
        and not f.should_keep_local
        and f.storage_object.query.startswith(bucket)
        and same_endpoint(getattr(f.storage_object.provider.settings, "endpoint_url", None))
    )


def server_fetchable(prefix: Optional[str], endpoint: Optional[str]) -> Callable[[Any], Dict[str, str]]:
    """job -> {local path: URL} of its storage inputs the TES server fetches itself (see
    ``_server_reaches``), so their bytes skip this machine. Directories, ``retrieve=False``
    inputs and those whose local copy is to be kept (``keep_local``) are left to the host."""
    reaches = _server_reaches(prefix, endpoint)

    def urls(job: Any) -> Dict[str, str]:
        return {
            os.path.abspath(str(f)): f.storage_object.query
            for single in single_jobs(job)
            for f in single.input
            if reaches(f) and f not in _from_own_group(single)
        }

    return urls


def server_writable(prefix: Optional[str], endpoint: Optional[str]) -> Callable[[Any], Dict[str, str]]:
    """job -> {local path: URL} of its storage outputs the TES server uploads itself from
    the task, so their bytes skip this machine; the host then only checks that they are in
    storage. Left to the host: the same kinds as for inputs, ``update()`` outputs (their old
    content comes in as a local file), and what a later job of the job's group reads (a
    group's files stay local until the whole group has run)."""
    reaches = _server_reaches(prefix, endpoint)

    def urls(job: Any) -> Dict[str, str]:
        return {
            os.path.abspath(str(f)): f.storage_object.query
            for single in single_jobs(job)
            for f in single.output
            if reaches(f) and not is_flagged(f, "update") and f not in _to_own_group(single)
        }

    return urls


def _from_own_group(job: Any) -> Set[Any]:
    """The inputs of a group's job that another job of the group writes: they are stored
    only when the whole group has run, so its later tasks read them where the earlier left
    them."""
    if job.group is None:
        return set()
    return {
        f
        for producer, files in job.dag.dependencies[job].items()
        if producer.group == job.group and job.dag.needrun(producer)
        for f in files
    }


def _to_own_group(job: Any) -> Set[Any]:
    """The outputs of a group's job that another job of the group reads."""
    if job.group is None:
        return set()
    return {
        f
        for consumer, files in job.dag.depending[job].items()
        if consumer.group == job.group and job.dag.needrun(consumer)
        for f in files
    }


async def retrieve_inputs(job: Any, by_url: Collection[str] = ()) -> None:
    """Before a job that runs directly: its storage inputs at their local paths, as
    Snakemake's scheduler does for a local job; ``by_url``: local paths the backend
    fetches itself."""
    if not by_url:
        await job.dag.retrieve_storage_inputs(jobs=[job], also_missing_internal=True)
        return
    files = {
        f for single in single_jobs(job) for f in single.input
        if f.is_storage and os.path.abspath(str(f)) not in by_url
    }
    # as Snakemake's retrieve_storage_inputs: what a job of the group writes is not there yet
    present = [f for f in files if await f.exists_in_storage()]
    await asyncio.gather(*(f.retrieve_from_storage() for f in present))


async def store_outputs(job: Any, stored: Collection[str] = ()) -> None:
    """After a job that ran directly succeeded (and was post-processed): its storage
    outputs, logs and benchmark stored, as Snakemake's local executor does
    (``DAG.handle_storage``, which also drops local copies nobody needs any more).
    ``stored``: local paths of outputs the backend put into storage itself: they are only
    checked to be there, as Snakemake checks a remote job's storage outputs."""
    for single in single_jobs(job):
        if not stored:
            await single.dag.handle_storage(single)
            continue
        by_server = [f for f in single.output if os.path.abspath(str(f)) in stored]
        await wait_for_files(
            by_server, latency_wait=single.dag.workflow.execution_settings.latency_wait
        )
        for f in (*single.output, *single.log, *([single.benchmark] if single.benchmark else [])):
            if (
                f.is_storage
                and not f.should_not_be_retrieved_from_storage
                and not any(is_flagged(f, flag) for flag in ("pipe", "service", "nodelocal"))
                and f not in by_server
            ):
                await f.store_in_storage()
                mtime = (await f.mtime()).storage()
                f.touch(times=(mtime, mtime))
        # the rest of handle_storage: local copies of inputs nobody needs any more
        await single.dag.handle_storage(single, store_in_storage=False)


async def store_logs(job: Any) -> None:
    """After a job that ran directly failed: its storage logs that it wrote, stored, as
    Snakemake's local executor does for a failed job (the first thing a user reads)."""
    for single in single_jobs(job):
        for f in single.log:
            if f.is_storage and await f.exists_local():
                await f.store_in_storage()


def cacheable(job: Any, workflow: Any) -> bool:
    """A job of a ``cache: True`` rule run with --cache: its outputs go to Snakemake's
    between-workflow cache."""
    return (
        workflow.output_file_cache is not None
        and not job.is_group()
        and bool(job.rule.cache and job.rule.cache.output)
    )


def restore_cached(job: Any, workflow: Any) -> bool:
    """Whether the between-workflow cache holds the outputs of a ``cacheable`` job: then
    they are restored, and stored as after a job that ran (outputs in a default storage
    provider go there)."""
    from snakemake.exceptions import CacheMissException

    if not cacheable(job, workflow):
        return False
    try:
        workflow.async_run(job.rule.cache.fetch(job))
    except CacheMissException:
        return False
    workflow.async_run(store_outputs(job))
    return True


async def to_cache(job: Any, workflow: Any) -> Optional[str]:
    """The outputs of a ``cacheable`` job that succeeded stored in the cache; why not, or None."""
    if not cacheable(job, workflow):
        return None
    try:
        await job.rule.cache.store(job)
    except Exception as e:  # Snakemake's message: an unwritable cache, ...
        return f"rule {job.rule.name}: storing its outputs in the cache failed: {e}"
    return None
