"""Funnel on Slurm, an HPC centre's TES (issue 34, item 4): a workflow through a Funnel whose
tasks are sbatch jobs on a one-node Slurm (tests/services.py), its files checked, and the
allocation Slurm gave a rule with threads and memory."""

import pytest

from conftest import copy_workflow, tasks_of, tes_run
from expectations import read

pytestmark = pytest.mark.tes


def test_a_workflow_runs_on_funnel_on_slurm_with_the_allocation_asked(tes_slurm, tmp_path):
    workdir = copy_workflow("tes_slurm", tmp_path / "wf")
    (workdir / "data").mkdir()
    (workdir / "data" / "a.txt").write_text("hello a\n")
    (workdir / "data" / "b.txt").write_text("hello b\n")

    done = tes_run(tes_slurm, workdir)
    assert done.returncode == 0, done.stderr
    joined = "HELLO A\nHELLO B\nthreads=2 omp=2 shell=bash\n"
    assert read(workdir / "results" / "joined.txt") == joined
    assert read(workdir / "results" / "tree" / "sub" / "copy.txt") == joined

    tasks = {t["tags"]["crank-rule"]: t for t in tasks_of(tes_slurm, workdir)}
    assert sorted(tasks) == ["rule join", "rule tree", "rule upper"]
    assert {t["state"] for t in tasks.values()} == {"COMPLETE"}
    # each task was a Slurm job named after it; the join rule's got 2 CPUs and 3G
    job = tes_slurm.slurm.job(tasks["rule join"]["id"])
    assert (job.get("NumCPUs"), job.get("MinMemoryNode")) == ("2", "3G"), job
    assert "cpu=2,mem=3G" in job.get("TRES", ""), job
    assert tes_slurm.slurm.job(tasks["rule tree"]["id"]).get("JobState") == "COMPLETED"
