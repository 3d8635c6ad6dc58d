"""The settings' checks, the same for every backend, before any backend is built: no
engine, no server."""

import pytest

from snakemake_executor_plugin_crank.errors import CrankError
from snakemake_executor_plugin_crank.settings import ExecutorSettings, backend_from, image_hint


@pytest.mark.parametrize("backend", ["docker", "tes"])
def test_a_negative_backend_tolerance_is_refused_on_every_backend(backend, tmp_path):
    settings = ExecutorSettings(
        backend=backend, backend_tolerance=-1.0,
        # a TES server and store that do not exist: the check comes before any connection
        tes_url="http://127.0.0.1:9", storage_prefix=f"file://{tmp_path}/store",
        docker_url="unix:///nonexistent/docker.sock",
    )
    with pytest.raises(CrankError) as e:
        backend_from(settings, "run", str(tmp_path))
    assert str(e.value) == "--crank-backend-tolerance -1.0 must be a number of seconds >= 0"


def test_the_image_hint_names_the_backend_in_use():
    assert "Docker engine" in image_hint(ExecutorSettings(backend="docker"))
    assert "--crank-docker-pull never" in image_hint(
        ExecutorSettings(backend="docker", docker_pull="never")
    )
    tes = image_hint(ExecutorSettings(backend="tes", docker_pull="never"))
    assert "Docker" not in tes and "TES" in tes
