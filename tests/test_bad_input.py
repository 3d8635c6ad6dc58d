"""Bad input on the Docker backend: every case ends with a non-zero exit and one line that
names the culprit and says what to do; no traceback, no container left, no partial file
under a final name. See docs/reliability.md."""

import os
import textwrap

import pytest

from conftest import BUSYBOX, snakemake

pytestmark = pytest.mark.docker

SNAKEFILE = textwrap.dedent(
    """
    config.setdefault("image", "crank-test/busybox:1")
    config.setdefault("target", "out/placed.txt")

    rule plain:
        output: "out/plain.txt"
        shell: "echo partial > {output}; echo done >> {output}"

    rule imaged:
        output: "out/imaged.txt"
        container: config["image"]
        shell: "echo x > {output}"

    rule resourced:
        output: "out/resourced.txt"
        threads: int(config.get("threads", 1))
        resources: **{k: v for k, v in config.items() if k in ("mem_mb", "disk_mb", "runtime", "gpu")}
        shell: "echo x > {output}"

    rule placed:
        output: config["target"]
        shell: "echo x > {output}"

    rule scripted:
        output: "out/scripted.txt"
        run:
            open(output[0], "w").write("x")
    """
)

# (id, snakemake arguments, culprit, what to do): culprit and advice on the same line
CASES = [
    ("backend-tes", ["plain", "--crank-backend", "tes"],
     "--crank-backend tes needs", "--crank-tes-url"),
    ("host-config-json", ["plain", "--crank-docker-host-config", "{shm"],
     "--crank-docker-host-config is not valid JSON", "JSON object"),
    ("host-config-list", ["plain", "--crank-docker-host-config", "[1]"],
     "--crank-docker-host-config must be a JSON object", "{"),
    ("host-config-key", ["plain", "--crank-docker-host-config", '{"shm_sise": "1g"}'],
     "--crank-docker-host-config", "shm_sise"),
    ("host-config-value", ["plain", "--crank-docker-host-config", '{"mem_limit": "lots"}'],
     "--crank-docker-host-config", "mem_limit"),
    ("url-missing-socket", ["plain", "--crank-docker-url", "unix:///nonexistent/docker.sock"],
     "cannot reach the Docker engine at unix:///nonexistent/docker.sock", "start dockerd"),
    ("url-scheme", ["plain", "--crank-docker-url", "ftp://localhost/docker"],
     "'ftp://localhost/docker' is not a Docker engine address", "unix://"),
    ("url-refused", ["plain", "--crank-docker-url", "tcp://127.0.0.1:9"],
     "cannot reach the Docker engine at tcp://127.0.0.1:9", "--crank-docker-url"),
    ("network-unknown", ["plain", "--crank-docker-network", "crank-no-such-net"],
     "--crank-docker-network 'crank-no-such-net'", "docker network create"),
    ("image-missing-nopull", ["imaged", "--config", "image=crank-test/does-not-exist:1",
                              "--crank-docker-pull", "never"],
     "image 'crank-test/does-not-exist:1' is not on the Docker engine", "rule imaged"),
    ("image-uppercase", ["imaged", "--config", "image=Crank-Test/busybox:1"],
     "'Crank-Test/busybox:1'", "container: image of rule imaged"),
    ("image-double-colon", ["imaged", "--config", "image=x::1"],
     "'x::1'", "container: image of rule imaged"),
    ("image-bad-digest", ["imaged", "--config", "image=crank-test/busybox@sha256:12"],
     "'crank-test/busybox@sha256:12'", "container: image of rule imaged"),
    ("default-image-missing", ["plain", "--crank-default-image", "crank-test/nothing:1",
                               "--crank-docker-pull", "never"],
     "image 'crank-test/nothing:1'", "--crank-default-image"),
    ("default-from-container-image", ["plain", "--crank-default-image", "",
                                      "--container-image", "crank-test/absent:2",
                                      "--crank-docker-pull", "never"],
     "--container-image", "--crank-default-image"),
    ("gpu-not-number", ["resourced", "--config", "gpu=many"],
     "resource gpu='many' is not a number", "whole number"),
    ("gpu-no-runtime", ["resourced", "--config", "gpu=1"],
     "rule resourced asks for gpu=1", "NVIDIA"),
    ("tolerance-negative", ["plain", "--crank-backend-tolerance", "-1"],
     "--crank-backend-tolerance -1", "seconds"),
    ("mem-above", ["resourced", "--config", "mem_mb=900000000"],
     "asks for mem_mb=900000000", "--crank-clamp-resources"),
    ("mem-negative", ["resourced", "--config", "mem_mb=-5"],
     "resource mem_mb=-5", "whole number"),
    ("url-not-a-socket", ["plain", "--crank-docker-url", "unix:///etc/hostname"],
     "cannot reach the Docker engine at unix:///etc/hostname", "start dockerd"),
    ("gpu-negative", ["resourced", "--config", "gpu=-1"],
     "resource gpu=-1", "whole number"),
    ("tolerance-nan", ["plain", "--crank-backend-tolerance", "nan"],
     "--crank-backend-tolerance nan", "seconds"),
    ("stall-zero", ["plain", "--crank-backend", "tes", "--crank-storage-stall", "0"],
     "--crank-storage-stall 0.0", "seconds > 0"),
    ("output-under-proc", ["placed", "--config", "target=/proc/crank-test/x.txt"],
     "cannot create the directory '/proc/crank-test'", "writable"),
    ("output-readonly-fs", ["placed", "--config", "target=/sys/crank-test/x.txt"],
     "cannot create the directory '/sys/crank-test'", "writable"),
    ("run-without-snakemake", ["scripted", "--container-image", BUSYBOX],
     f"image {BUSYBOX} has no Snakemake", "--container-image"),
]


def _fresh(tmp_path):
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    (workdir / "afile").write_text("a file, not a directory\n")
    return workdir


@pytest.mark.parametrize("args,culprit,advice", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(engine, api, tmp_path, args, culprit, advice):
    workdir = _fresh(tmp_path)
    before = set(_files(workdir))
    done = snakemake(workdir, "--crank-docker-url", engine.url, "--crank-docker-network", "none",
                     *args, timeout=120)
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if culprit in line]
    assert lines, f"no line names {culprit!r}:\n{done.stderr}"
    assert any(advice in line for line in lines), f"no advice {advice!r} in {lines}"
    assert api.containers(all=True) == []
    # nothing the job would have written exists under its final name
    new = {f for f in set(_files(workdir)) - before if not f.startswith(".snakemake")}
    assert new <= {"out"}, new


def _files(workdir):
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            yield os.path.relpath(os.path.join(root, name), workdir)


def test_matrix_has_enough_cases():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)
