"""Live logs (issue 31): a running job's stdout and stderr grow in the files the failure
message names, on a warm Docker runner (its files bound or copied), in a container of its own
and on TES, and end up
complete: every byte once, also after a burst larger than a TES server's tail."""

import uuid

import pytest

from conftest import OnDocker, OnDockerCopying, OnTes, wait_for

# a line on each stream every half second for 8 s, then a burst of 220 kB (far more than the
# 10 kB tail Funnel keeps), then one more line
SNAKEFILE = r"""
rule talk:
    output: "said.txt"
    shell: "for i in $(seq 1 16); do echo out $i; echo err $i >&2; sleep 0.5; done; "
           "awk 'BEGIN {{ for (i = 0; i < 20000; i++) print \"0123456789\" }}'; echo end; echo done > {output}"
"""
STDOUT = "".join(f"out {i}\n" for i in range(1, 17)) + "0123456789\n" * 20000 + "end\n"
STDERR = "".join(f"err {i}\n" for i in range(1, 17))


@pytest.mark.parametrize("backend", [
    pytest.param("warm", marks=pytest.mark.docker), pytest.param("cold", marks=pytest.mark.docker),
    pytest.param("warm-copy", marks=pytest.mark.docker),
    pytest.param("tes", marks=pytest.mark.tes),
])
def test_a_running_jobs_logs_grow_and_end_complete(backend, request, tmp_path):
    if backend == "tes":
        crank, args = OnTes(request.getfixturevalue("tes")), ()
    else:
        on = (OnDockerCopying if backend.endswith("-copy") else OnDocker)(request.getfixturevalue("docker_api"))
        crank, args = on, ("--crank-docker-warm", "no" if backend == "cold" else "yes")
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    proc = crank.start(workdir, *args)
    try:
        logs = workdir / ".snakemake" / "crank" / "logs"

        def shown(suffix: str) -> str:
            return "".join(p.read_text() for p in logs.glob(f"*/talk-*{suffix}"))

        # while the job runs (its output not there yet), within about 5 s of its writing
        wait_for(lambda: "out 4\n" in shown(".stdout") and "err 4\n" in shown(".stderr"), 25,
                 "the running job's lines 1-4 in its live logs")
        assert not (workdir / "said.txt").exists() and proc.poll() is None
        assert "out 16" not in shown(".stdout")
        live_inode = next(logs.glob("*/talk-*.stdout")).stat().st_ino
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    stdout, = logs.glob("*/talk-*.stdout")
    stderr, = logs.glob("*/talk-*.stderr")
    assert stdout.read_text() == STDOUT and stderr.read_text() == STDERR
    assert not [p for p in logs.rglob("*") if p.name.startswith(".")]  # no temporary file left
    if backend != "tes":  # what was shown was the log's start: the rest was appended (tail -f)
        assert stdout.stat().st_ino == live_inode
