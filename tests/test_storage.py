"""Snakemake's storage layer under crank, end to end: storage() files (the real S3 plugin
against SeaweedFS with enforced credentials, the real HTTP plugin against a loopback web
server), a default storage provider, the between-workflow output cache, and which tasks get
the storage plugins' settings. Each case is compared with Snakemake's local executor."""

import functools
import hashlib
import json
import http.server
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests

from conftest import SNAKEMAKE_IMAGE, SNAKEMAKE_S3_IMAGE, OnDocker, OnTes, copy_workflow, tasks_of

pytestmark = pytest.mark.s3


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def bucket(s3):
    """The test bucket, through the plugin's own client library (boto3)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.values["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.values["AWS_SECRET_ACCESS_KEY"],
        region_name=s3.values.get("AWS_REGION", "us-east-1"),
    )

    class Bucket:
        name = s3.bucket

        def prefix(self) -> str:
            """A key prefix of one run's own."""
            return f"storage-tests/{uuid.uuid4().hex}"

        def put(self, key: str, body: bytes) -> None:
            client.put_object(Bucket=s3.bucket, Key=key, Body=body)

        def objects(self, prefix: str) -> dict:
            """key below ``prefix`` -> content."""
            found = {}
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=s3.bucket, Prefix=prefix + "/"
            ):
                for item in page.get("Contents", []):
                    body = client.get_object(Bucket=s3.bucket, Key=item["Key"])["Body"].read()
                    found[item["Key"][len(prefix) + 1 :]] = body
            return found

    return Bucket()


def storage_args(s3) -> tuple:
    """The S3 plugin's settings on the command line, as a user passes them."""
    return (
        "--storage-s3-endpoint-url", s3.endpoint,
        "--storage-s3-access-key", s3.values["AWS_ACCESS_KEY_ID"],
        "--storage-s3-secret-key", s3.values["AWS_SECRET_ACCESS_KEY"],
    )


def without_aws(env) -> dict:
    """No AWS_* variables: the plugin gets its credentials from its settings only."""
    return {k: v for k, v in env.items() if not k.startswith("AWS_")}


def local_run(workdir: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    """Snakemake's local executor, the reference every case is compared with."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *args],
        cwd=workdir, capture_output=True, text=True, timeout=300,
        env=without_aws({**os.environ, **(env or {})}), stdin=subprocess.DEVNULL,
    )


def crank_run(crank, workdir: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    """crank on its backend, with Snakemake in the image for run: rules. On Docker without
    AWS_* variables (the storage plugin gets its settings only); on TES crank's own staging
    store keeps them."""
    environment = {**crank.env(), **(env or {})}
    if crank.backend == "docker":
        environment = without_aws(environment)
    return subprocess.run(
        crank.command(workdir, "--container-image", SNAKEMAKE_IMAGE, *args), cwd=workdir,
        capture_output=True, text=True, timeout=300, env=environment, stdin=subprocess.DEVNULL,
    )


def docker_run(workdir: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return crank_run(OnDocker(None), workdir, *args, env=env)


def on(crank):
    """``run(workdir, *args, env=None)`` for the crank fixture's backend."""
    return functools.partial(crank_run, crank)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A loopback web server serving a directory of its own."""
    root = tmp_path_factory.mktemp("web")
    (root / "page.txt").write_text("a page\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def broken_web(tmp_path):
    """A web server that says a page exists (HEAD) but drops the connection on a GET (the
    HTTP plugin would store a 500 page as the file's content)."""
    root = tmp_path / "broken-web"
    root.mkdir()
    (root / "page.txt").write_text("a page\n")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# ---------------------------------------------------------------- storage plugins on the host


def test_run_rule_needs_no_storage_plugin_in_the_image(crank, tmp_path):
    """The S3 and HTTP plugins are installed on the host (the test extra), not in the image:
    Snakemake's job command must not name their settings."""
    workdir = copy_workflow("storage_secrets", tmp_path / "w")
    ok(crank_run(crank, workdir, "run_env.txt"))
    assert (workdir / "run_env.txt").is_file()


# ---------------------------------------------------------------- secrets


SECRET_NAMES = ("SNAKEMAKE_STORAGE_S3_SECRET_KEY", "SNAKEMAKE_STORAGE_S3_ACCESS_KEY")


def secrets_workdir(tmp_path: Path):
    workdir = copy_workflow("storage_secrets", tmp_path / "w")
    # a user's own --envvars still go to every task
    args = ("--envvars", "CRANK_TEST_USER_VAR")
    return workdir, args, {"CRANK_TEST_USER_VAR": "mine"}


def assert_no_secret(workdir: Path, s3) -> None:
    secret = s3.values["AWS_SECRET_ACCESS_KEY"]
    for name in ("shell_env.txt", "run_env.txt"):
        text = (workdir / name).read_text()
        assert "CRANK_TEST_USER_VAR=mine" in text, name
        assert secret not in text, name
        assert not any(n in text for n in SECRET_NAMES), name


def test_storage_secrets_stay_out_of_tasks_that_do_not_use_storage(crank, s3, tmp_path):
    workdir, args, env = secrets_workdir(tmp_path)
    ok(crank_run(crank, workdir, *args, *storage_args(s3), env=env))
    assert_no_secret(workdir, s3)
    if crank.backend == "tes":  # nor in the task bodies the server keeps
        tasks = tasks_of(crank.tes, workdir)
        assert len(tasks) == 2
        for task in tasks:
            full = requests.get(f"{crank.tes.url}/v1/tasks/{task['id']}", params={"view": "FULL"},
                                timeout=30)
            full.raise_for_status()
            assert s3.values["AWS_SECRET_ACCESS_KEY"] not in full.text
            assert not any(n in full.text for n in SECRET_NAMES)


# ---------------------------------------------------------------- storage() files


def objects_workdir(tmp_path: Path, bucket, web, name: str):
    workdir = copy_workflow("storage_objects", tmp_path / name)
    prefix = bucket.prefix()
    bucket.put(f"{prefix}/in/in.txt", b"hello storage\n")
    config = ("--config", f"prefix=s3://{bucket.name}/{prefix}", f"http={web}")
    return workdir, prefix, config


def local_copies(workdir: Path, prefix: str) -> list:
    """The local copies of storage files left in the workdir, named without the run's
    prefix and the web server's port."""
    root = workdir / ".snakemake" / "storage"
    found = []
    for path in root.rglob("*") if root.exists() else ():
        if path.is_file():
            parts = list(path.relative_to(root).parts)
            if parts[0] == "http":
                parts[1] = "WEB"
            found.append("/".join(parts).replace(prefix, "PREFIX"))
    return sorted(found)


def assert_like_local(run, tmp_path: Path, bucket, web, s3, *args: str) -> None:
    local, local_prefix, local_config = objects_workdir(tmp_path, bucket, web, "local")
    ok(local_run(local, *local_config, *storage_args(s3), *args))
    workdir, prefix, config = objects_workdir(tmp_path, bucket, web, "crank")
    ok(run(workdir, *config, *storage_args(s3), *args))
    # the local copies Snakemake keeps (--keep-storage-local-copies) or drops, as locally
    assert local_copies(workdir, prefix) == local_copies(local, local_prefix)
    expected = bucket.objects(local_prefix)
    assert expected["out/upper.txt"] == b"HELLO STORAGE\n"
    assert set(expected) == {"in/in.txt", "out/upper.txt", "logs/upper.log"}
    assert bucket.objects(prefix) == expected
    joined = (workdir / "results" / "joined.txt").read_text()
    assert joined == (local / "results" / "joined.txt").read_text() == "HELLO STORAGE\na page\n"
    # a second run finds everything up to date in storage, as locally
    again = ok(run(workdir, *config, *storage_args(s3), *args))
    assert "Nothing to be done" in again.stderr


def test_storage_files_are_retrieved_and_stored(crank, s3, bucket, web, tmp_path):
    assert_like_local(on(crank), tmp_path, bucket, web, s3)


def test_kept_local_copies(crank, s3, bucket, web, tmp_path):
    assert_like_local(on(crank), tmp_path, bucket, web, s3, "--keep-storage-local-copies")


def assert_failed_jobs_log_stored_like_local(run, tmp_path: Path, bucket, s3) -> None:
    results = {}
    for name, runner in (("local", local_run), ("crank", run)):
        workdir = copy_workflow("storage_failing", tmp_path / name)
        prefix = bucket.prefix()
        done = runner(workdir, "--config", f"prefix=s3://{bucket.name}/{prefix}", *storage_args(s3))
        assert done.returncode != 0
        results[name] = bucket.objects(prefix)
    assert results["local"] == {"logs/fail.log": b"diagnostics\n"}
    assert results["crank"] == results["local"]


def test_failed_jobs_storage_log_is_stored(crank, s3, bucket, tmp_path):
    assert_failed_jobs_log_stored_like_local(on(crank), tmp_path, bucket, s3)


@pytest.mark.docker
def test_a_failed_retrieval_fails_the_job_in_one_line(docker_api, s3, bucket, broken_web, tmp_path):
    workdir, _, config = objects_workdir(tmp_path, bucket, broken_web, "crank")
    done = docker_run(workdir, *config, *storage_args(s3))
    assert done.returncode != 0
    assert "rule join: retrieving its storage inputs failed: " in done.stderr
    assert "Traceback" not in done.stderr
    assert not (workdir / "results" / "joined.txt").exists()


# ---------------------------------------------------------------- default storage provider


def assert_default_storage_like_local(run, tmp_path: Path, bucket, s3, *args: str) -> None:
    results = {}
    for name, runner in (("local", local_run), ("crank", run)):
        workdir = copy_workflow("storage_default", tmp_path / name)
        prefix = bucket.prefix()
        ok(runner(workdir, "--default-storage-provider", "s3",
                  "--default-storage-prefix", f"s3://{bucket.name}/{prefix}", *storage_args(s3),
                  *args))
        results[name] = bucket.objects(prefix)
        # every file lives in the store: nothing of the workflow's in the workdir
        assert not (workdir / "c.txt").exists()
    assert results["local"]["c.txt"] == b"a\nb\nc\n"
    assert results["crank"] == results["local"]


def default_run_args(bucket, s3, image: str) -> tuple:
    prefix = bucket.prefix()
    return prefix, (
        "--default-storage-provider", "s3", "--default-storage-prefix",
        f"s3://{bucket.name}/{prefix}", "--container-image", image, *storage_args(s3),
    )


@pytest.mark.docker
def test_run_rule_with_default_storage_reaches_the_store_from_the_image(
    docker_api, s3, bucket, tmp_path
):
    """Snakemake in the image stores the run: rule's output itself: it gets the plugin's
    settings and secrets (and the store is on the host's loopback: host network)."""
    local = copy_workflow("storage_default_run", tmp_path / "local")
    local_prefix, args = default_run_args(bucket, s3, SNAKEMAKE_S3_IMAGE)
    ok(local_run(local, *args))
    workdir = copy_workflow("storage_default_run", tmp_path / "crank")
    prefix, args = default_run_args(bucket, s3, SNAKEMAKE_S3_IMAGE)
    ok(docker_run(workdir, *args, "--crank-docker-network", "host"))
    assert bucket.objects(prefix) == bucket.objects(local_prefix)
    assert bucket.objects(prefix)["b.txt"] == b"a\nb from run\n"


@pytest.mark.docker
def test_image_without_the_storage_plugin_is_one_clear_line(docker_api, s3, bucket, tmp_path):
    workdir = copy_workflow("storage_default_run", tmp_path / "crank")
    _, args = default_run_args(bucket, s3, SNAKEMAKE_IMAGE)
    done = docker_run(workdir, *args)
    assert done.returncode != 0
    assert (
        f"crank: image {SNAKEMAKE_IMAGE} has no snakemake-storage-plugin-s3, which Snakemake in "
        "it needs for the workflow's s3 storage (rule b); install it in the image (pip install "
        "snakemake-storage-plugin-s3)"
    ) in done.stderr
    assert "unrecognized arguments" not in done.stderr


def test_default_storage_provider(crank, s3, bucket, tmp_path):
    assert_default_storage_like_local(on(crank), tmp_path, bucket, s3)


def test_default_storage_provider_with_a_group(crank, s3, bucket, tmp_path):
    """a and b in one group: b reads a.txt before the group's outputs are stored."""
    assert_default_storage_like_local(on(crank), tmp_path, bucket, s3, "--groups", "a=g", "b=g")


# ---------------------------------------------------------------- between-workflow cache


def assert_cache_like_local(run, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"SNAKEMAKE_OUTPUT_CACHE": str(cache)}
    first = copy_workflow("storage_cache", tmp_path / "first")
    ok(run(first, "--cache", "a", env=env))
    computed = (first / "a.txt").read_text()
    assert len(list(cache.iterdir())) == 1  # stored in the cache
    second = copy_workflow("storage_cache", tmp_path / "second")
    done = ok(run(second, "--cache", "a", env=env))
    # reused, not recomputed: the same content, in the consumer too
    assert (second / "a.txt").read_text() == computed
    assert (second / "b.txt").read_text() == computed
    assert "from cache" in done.stderr
    # the local executor reuses what crank stored
    local = copy_workflow("storage_cache", tmp_path / "local")
    ok(local_run(local, "--cache", "a", env=env))
    assert (local / "a.txt").read_text() == computed


def assert_cache_in_storage_like_local(run, tmp_path: Path, bucket, s3) -> None:
    """The cache itself in the default storage provider (SNAKEMAKE_OUTPUT_CACHE an s3:// URL)."""
    prefix = bucket.prefix()
    env = {"SNAKEMAKE_OUTPUT_CACHE": f"s3://{bucket.name}/{prefix}/cache"}
    for name, runner in (("first", run), ("second", run), ("local", local_run)):
        workdir = copy_workflow("storage_cache", tmp_path / name)
        ok(runner(workdir, "--cache", "a", "--default-storage-provider", "s3",
                  "--default-storage-prefix", f"s3://{bucket.name}/{prefix}/{name}",
                  *storage_args(s3), env=env))
    objects = bucket.objects(prefix)
    assert len([key for key in objects if key.startswith("cache/")]) == 1
    computed = objects["first/a.txt"]
    for name in ("second", "local"):
        assert objects[f"{name}/a.txt"] == objects[f"{name}/b.txt"] == computed, name


def test_output_cache_in_storage(crank, s3, bucket, tmp_path):
    assert_cache_in_storage_like_local(on(crank), tmp_path, bucket, s3)


def test_output_cache_is_stored_and_reused(crank, tmp_path):
    assert_cache_like_local(on(crank), tmp_path)


# ---------------------------------------------------------------- TES: objects by URL


@pytest.mark.tes
def test_tes_server_moves_storage_files_itself(tes, s3, bucket, tmp_path):
    """Storage inputs and outputs in the bucket of crank's storage prefix go into the task
    as URLs that the server fetches and uploads: this machine never downloads or stores
    them, intermediate files included, and the store ends as after a local run.
    Everything this machine sends to the store goes through a proxy that records it (the
    server reaches the store directly)."""
    from faultproxy import FaultProxy

    local = copy_workflow("storage_default", tmp_path / "local")
    local_prefix = bucket.prefix()
    ok(local_run(local, "--default-storage-provider", "s3",
                 "--default-storage-prefix", f"s3://{bucket.name}/{local_prefix}", *storage_args(s3)))
    host, port = s3.endpoint.rsplit("//", 1)[1].split(":")
    with FaultProxy(("127.0.0.1", 0), (host, int(port))) as proxy:
        args = (
            "--storage-s3-endpoint-url", proxy.url,
            "--storage-s3-access-key", s3.values["AWS_ACCESS_KEY_ID"],
            "--storage-s3-secret-key", s3.values["AWS_SECRET_ACCESS_KEY"],
            "--crank-storage-endpoint", proxy.url,
        )
        workdir = copy_workflow("storage_default", tmp_path / "crank")
        prefix = bucket.prefix()
        ok(crank_run(OnTes(tes), workdir, "--default-storage-provider", "s3",
                   "--default-storage-prefix", f"s3://{bucket.name}/{prefix}", *args))
        requests_seen = list(proxy.seen)
    assert bucket.objects(prefix) == bucket.objects(local_prefix) == {
        "a.txt": b"a\n", "sub/b.txt": b"a\nb\n", "logs/b.log": b"logged\n", "c.txt": b"a\nb\nc\n"
    }
    # the workflow's outputs went from task to store and on to the next task without this
    # machine: never downloaded, never stored by it, never staged (sent or fetched) under
    # their content's digest, never collected from the task (each rule's output is its
    # product p000000); the log of rule b is a log, which this machine stores
    moved = [(m, path) for m, path, _ in requests_seen if m in ("GET", "PUT")]
    for name, content in (("a.txt", b"a\n"), ("sub/b.txt", b"a\nb\n"), ("c.txt", b"a\nb\nc\n")):
        assert not any(path.split("?")[0].endswith(f"{prefix}/{name}") for _, path in moved), [x for x in moved if prefix in x[1]]
        digest = hashlib.sha256(content).hexdigest()
        assert not any(digest in path for _, path in moved), name
    assert not any(path.split("?")[0].endswith("/p000000") for _, path in moved), moved
    assert any(m == "PUT" and path.split("?")[0].endswith(f"{prefix}/logs/b.log")
               for m, path in moved), moved
    bodies = [
        requests.get(f"{tes.url}/v1/tasks/{t['id']}", params={"view": "FULL"}, timeout=30).json()
        for t in tasks_of(tes, workdir)
    ]
    urls = {i.get("url") for body in bodies for i in body.get("inputs", [])}
    assert f"s3://{bucket.name}/{prefix}/a.txt" in urls
    uploads = {o.get("url") for body in bodies for o in body.get("outputs", [])}
    assert f"s3://{bucket.name}/{prefix}/sub" in uploads


# ---------------------------------------------------------------- the workflow's sources


def sources_workdir(tmp_path: Path, name: str, extra_files: int = 0) -> Path:
    """The workflow in a git checkout whose files are all tracked (``extra_files`` more)."""
    workdir = copy_workflow("tes_sources", tmp_path / name)
    for n in range(extra_files):
        (workdir / "many" / f"{n // 100}").mkdir(parents=True, exist_ok=True)
        (workdir / "many" / f"{n // 100}" / f"f{n}.txt").write_text(f"{n}\n")
    git = ["git", "-c", "user.email=crank@example.org", "-c", "user.name=crank"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "workflow"]):
        subprocess.run([*git, *command], cwd=workdir, check=True, capture_output=True)
    return workdir


def assert_sources_like_local(run, tmp_path: Path, extra_files: int = 0) -> Path:
    """A shell: job running a tracked script by path, and a module's rule reading a file
    beside the module's Snakefile: as with the local executor."""
    results = {}
    for name, runner in (("local", local_run), ("crank", run)):
        workdir = sources_workdir(tmp_path, name, extra_files)
        ok(runner(workdir))
        results[name] = {p: (workdir / p).read_text() for p in ("out/shell.txt", "out/module.txt")}
    assert results["local"] == {
        "out/shell.txt": "test.sh read: data\n", "out/module.txt": "table beside the module\n"
    }
    assert results["crank"] == results["local"]
    return workdir


def test_shell_jobs_read_the_workflows_sources(crank, tmp_path):
    """On TES the sources come as one archive input, the same for every task: a task body
    does not grow with the number of tracked files (here 500 more)."""
    if crank.backend == "docker":
        assert_sources_like_local(on(crank), tmp_path)
        return
    tes = crank.tes
    workdir = assert_sources_like_local(on(crank), tmp_path, extra_files=500)
    bodies = [
        requests.get(f"{tes.url}/v1/tasks/{t['id']}", params={"view": "FULL"}, timeout=30).json()
        for t in tasks_of(tes, workdir)
    ]
    assert len(bodies) == 2
    fetched = []
    for body in bodies:
        # run.sh, cmd.sh, the list of what crank put in place, the archive, and data.txt for
        # rule shell_script
        assert len(body["inputs"]) <= 5, [i["path"] for i in body["inputs"]]
        fetched.append({i["url"] for i in body["inputs"] if i.get("url")})
        sent = {k: v for k, v in body.items() if k not in ("logs", "state", "id", "creation_time")}
        assert len(json.dumps(sent)) < 12000  # 500 paths would add some 35,000
    source_sets = set.intersection(*fetched)
    assert len(source_sets) == 1
