"""Live logs (issue 31): a running job's stdout and stderr grow in the files the failure
message names, on a warm Docker runner (its files bound or copied), in a container of its own
and on TES, and end up
complete: every byte once, also after a burst larger than a TES server's tail."""

import uuid

import pytest

from conftest import OnDocker, OnDockerCopying, OnTes, wait_for

# a line on each stream every half second for LINES / 2 s, then a burst of 220 kB (far more
# than the 10 kB tail Funnel keeps), then one more line. Funnel sends a running task's tail
# every few seconds only, and on a busy machine first 4-8 s after the start: on TES the job
# writes for longer than that, so its lines can be seen while it runs.
LINES = {"tes": 40}
SNAKEFILE = r"""
rule talk:
    output: "said.txt"
    shell: "for i in $(seq 1 {lines}); do echo out $i; echo err $i >&2; sleep 0.5; done; "
           "awk 'BEGIN {{{{ for (i = 0; i < 20000; i++) print \"0123456789\" }}}}'; echo end; echo done > {{output}}"
"""


def expected(lines: int):
    return ("".join(f"out {i}\n" for i in range(1, lines + 1)) + "0123456789\n" * 20000 + "end\n",
            "".join(f"err {i}\n" for i in range(1, lines + 1)))


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
    lines = LINES.get(backend, 16)
    (workdir / "Snakefile").write_text(SNAKEFILE.format(lines=lines))
    proc = crank.start(workdir, *args)
    try:
        logs = workdir / ".snakemake" / "crank" / "logs"

        def shown(suffix: str) -> str:
            return "".join(p.read_text() for p in logs.glob(f"*/talk-*{suffix}"))

        # while the job runs (its output not there yet), within about 5 s of its writing
        wait_for(lambda: "out 4\n" in shown(".stdout") and "err 4\n" in shown(".stderr"), 25,
                 "the running job's lines 1-4 in its live logs")
        assert not (workdir / "said.txt").exists() and proc.poll() is None
        assert f"out {lines}" not in shown(".stdout")
        live_inode = next(logs.glob("*/talk-*.stdout")).stat().st_ino
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    stdout, = logs.glob("*/talk-*.stdout")
    stderr, = logs.glob("*/talk-*.stderr")
    assert (stdout.read_text(), stderr.read_text()) == expected(lines)
    assert not [p for p in logs.rglob("*") if p.name.startswith(".")]  # no temporary file left
    if backend != "tes":  # what was shown was the log's start: the rest was appended (tail -f)
        assert stdout.stat().st_ino == live_inode
