"""crank: every Snakemake job becomes a container task on one of the backends that
``backends/registry.py`` names (a Docker engine, a GA4GH TES server)."""

from snakemake_interface_executor_plugins.settings import CommonSettings

from .executor import Executor
from .settings import ExecutorSettings

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

__all__ = ["Executor", "ExecutorSettings", "common_settings"]
