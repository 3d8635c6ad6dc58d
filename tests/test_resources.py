"""Unit tests of the resource table: every row, the rules that combine rows, and fitting."""

import re
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.adapter.resources import IGNORED, TABLE, ignored_names, map_job
from snakemake_executor_plugin_crank.errors import CrankError
from snakemake_executor_plugin_crank.limits import fit
from snakemake_executor_plugin_crank.task import Capacity, Resources

DOC = Path(__file__).parent.parent / "docs" / "switching-from-slurm.md"


def mapped(threads=1, **resources):
    return map_job("rule r", threads, resources)


# ---------------------------------------------------------------- one test per row


def test_threads_are_the_cpus():
    assert mapped(4).resources == Resources(cpus=4)


def test_threads_zero_gets_one_cpu():
    assert mapped(0).resources.cpus == 1


def test_negative_threads_are_one_clear_line():
    with pytest.raises(CrankError, match=r"^rule r: threads=-1 must be a whole number >= 0$"):
        mapped(-1)


def test_cpus_per_task_wins_when_larger_than_threads_without_a_warning():
    m = mapped(1, cpus_per_task=6)
    assert m.resources.cpus == 6 and m.warnings == ()


def test_threads_above_cpus_per_task_win_with_a_warning():
    m = mapped(8, cpus_per_task=2)
    assert m.resources.cpus == 8
    assert m.warnings == (
        "rule r: threads=8 is more than cpus_per_task=2; the task gets 8 CPUs (Slurm would give 2)",
    )


@pytest.mark.parametrize("value", [0, -1])
def test_cpus_per_task_zero_or_less_is_unset(value):
    m = mapped(3, cpus_per_task=value)
    assert m.resources.cpus == 3 and m.warnings == ()


def test_cpus_per_gpu_times_gpus_when_larger():
    assert mapped(1, gpu=2, cpus_per_gpu=4).resources.cpus == 8
    assert mapped(16, gpu=2, cpus_per_gpu=4).resources.cpus == 16
    assert mapped(1, cpus_per_gpu=4).resources.cpus == 1  # no GPU: not used
    assert mapped(1, gpu=2, cpus_per_gpu=4, cpus_per_task=3).resources.cpus == 3


def test_mem_mb_is_the_memory_limit_and_zero_means_none():
    assert mapped(mem_mb=1500).resources.mem_mb == 1500
    assert mapped(mem_mb=0).resources.mem_mb is None


def test_mem_mb_per_cpu_times_cpus_takes_precedence_over_mem_mb():
    m = mapped(1, cpus_per_task=4, mem_mb_per_cpu=1000, mem_mb=2000)
    assert m.resources.mem_mb == 4000 and m.mem_mb_per_cpu == 1000
    assert m.warnings == ()  # the task gets more than mem_mb: nothing to say


def test_mem_mb_per_cpu_below_mem_mb_wins_silently_as_in_the_slurm_plugin():
    # Snakemake's default mem_mb is on every rule once a profile sets default resources
    m = mapped(2, mem_mb_per_cpu=1000, mem_mb=8000)
    assert m.resources.mem_mb == 2000 and m.warnings == ()


def test_ignored_names_are_those_ignored_whatever_their_value():
    assert ignored_names(["slurm_account", "tasks", "nodes", "gres", "mem_mb", "qos", "qos"]) == [
        "qos", "slurm_account",
    ]


def test_mem_mb_per_cpu_zero_is_unset():
    assert mapped(2, mem_mb_per_cpu=0, mem_mb=700).resources.mem_mb == 700


def test_disk_mb():
    assert mapped(disk_mb=2500).resources.disk_mb == 2500
    assert mapped(disk_mb=0).resources.disk_mb is None


@pytest.mark.parametrize(
    "value,seconds",
    [
        (90, 5400), ("90", 5400), (1.5, 90), (0, None),
        ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1d12h", 129600), ("90s", 90),
        ("5:30", 330), ("1:30:00", 5400), ("2-12", 216000), ("2-12:30", 217800),
        ("1-00:00:30", 86430),
    ],
)
def test_runtime_minutes_and_slurm_durations(value, seconds):
    assert mapped(runtime=value).resources.runtime_s == seconds


@pytest.mark.parametrize("value", ["soon", "1:2:3:4", "-5", -5, "1x"])
def test_runtime_that_is_no_duration_is_one_clear_line(value):
    with pytest.raises(CrankError, match=r"^rule r: resource runtime="):
        mapped(runtime=value)


def test_gpu_is_the_gpu_count():
    assert mapped(gpu=2).resources.gpus == 2
    assert mapped(gpu=0).resources.gpus == 0


@pytest.mark.parametrize(
    "gres,gpus,model",
    [("gpu", 1, None), ("gpu:2", 2, None), ("gpu:a100:1", 1, "a100"), ("gpu:tesla", 1, "tesla")],
)
def test_gres_gpu_forms(gres, gpus, model):
    res = mapped(gres=gres).resources
    assert (res.gpus, res.gpu_model) == (gpus, model)


def test_gres_other_than_gpu_is_ignored():
    m = mapped(gres="tmpspace:10G")
    assert m.resources.gpus == 0 and m.ignored == ("gres",)


def test_gres_not_in_slurm_syntax_is_one_clear_line():
    with pytest.raises(CrankError, match=r"^rule r: resource gres='gpu:a:b:2' is not a GRES"):
        mapped(gres="gpu:a:b:2")


def test_gpu_wins_over_a_disagreeing_gres_with_a_warning():
    m = mapped(gpu=1, gres="gpu:a100:2")
    assert (m.resources.gpus, m.resources.gpu_model) == (1, "a100")
    assert m.warnings == ("rule r: gpu=1 and gres=gpu:2 disagree; the task gets gpu=1 GPUs",)


def test_gpu_model_alone_asks_for_no_gpu_whatever_its_spelling():
    # Snakemake's test_string_resources: the local executor runs it and the command reads it
    for value in ("a100", "nvidia-tesla-1000", "anything at all!", "NVIDIA Tesla P100"):
        res = mapped(gpu_model=value).resources
        assert (res.gpus, res.gpu_model) == (0, None)
    assert mapped(gpu=0, gpu_model="nvidia-tesla-p100").resources.gpus == 0


@pytest.mark.parametrize("spelling,model", [
    ("a100", "a100"), ("nvidia-tesla-p100", "p100"), ("nvidia-tesla-t4", "t4"),
    ("NVIDIA-L4", "l4"), ("nvidia-a100-80gb", "a100_80gb"), ("Tesla V100", "v100"),
    ("nvidia_h100", "h100"), ("amd-mi250x", "mi250x"), ("tesla", "tesla"),
])
def test_gpu_model_of_other_executors_is_mapped_where_a_gpu_is_asked_for(spelling, model):
    res = mapped(gpu=3, gpu_model=spelling).resources
    assert (res.gpus, res.gpu_model) == (3, model)
    assert mapped(gres=f"gpu:{spelling.replace('-', '_').replace(' ', '_')}:1").resources.gpu_model == model


def test_gpu_model_that_is_no_name_is_one_clear_line_where_a_gpu_is_asked_for():
    with pytest.raises(CrankError, match=r"^rule r: resource gpu_model='a/100' is not a GPU model"):
        mapped(gpu=1, gpu_model="a/100")


@pytest.mark.parametrize("name", ["nodes", "tasks", "tasks_per_node"])
def test_one_node_or_task_is_ignored_and_more_is_one_clear_line(name):
    m = mapped(**{name: 1})
    assert m.ignored == (name,) and m.resources == Resources()
    with pytest.raises(CrankError, match=rf"^rule r: resource {name}=4 asks for a multi-node or MPI job"):
        mapped(**{name: 4})


IGNORED_ONLY = [row.name for row in TABLE if row.becomes == IGNORED and row.kind == "any"]


@pytest.mark.parametrize("name", IGNORED_ONLY)
def test_slurm_only_resources_are_accepted_and_listed_as_ignored(name):
    m = mapped(**{name: "something"})
    assert m.resources == Resources() and m.ignored == (name,) and m.warnings == ()


def test_every_row_is_tested():
    tested = {
        "threads", "cpus_per_task", "cpus_per_gpu", "mem_mb", "mem_mb_per_cpu", "disk_mb",
        "runtime", "gpu", "gres", "gpu_model", "nodes", "tasks", "tasks_per_node",
        *IGNORED_ONLY,
    }
    assert {row.name for row in TABLE} == tested


def test_unknown_and_remote_decided_resources_are_left_alone():
    m = mapped(tmpdir="<TBD>", mem_mb="<TBD>", mpi="srun", io=3, _nodes=1, _cores=2)
    assert m.resources == Resources() and m.ignored == () and m.warnings == ()


def test_a_full_slurm_profile_maps_exactly():
    m = map_job("rule align", 4, {
        "slurm_account": "lab", "slurm_partition": "short", "mem_mb_per_cpu": 1800,
        "mem_mb": 1000, "disk_mb": 1000, "runtime": "2h", "cpus_per_task": 8, "nodes": 1,
        "constraint": "avx2", "slurm_extra": "--mail-type=END", "gres": "gpu:a100:1",
    }, preemptible=True)
    assert m.resources == Resources(
        cpus=8, mem_mb=14400, disk_mb=1000, runtime_s=7200, gpus=1, preemptible=True,
        gpu_model="a100",
    )
    assert sorted(m.ignored) == ["constraint", "nodes", "slurm_account", "slurm_extra", "slurm_partition"]
    assert m.warnings == ()


def test_the_documentation_table_mirrors_the_code_table():
    rows = re.findall(r"^\| `([a-z_]+)` \| (.+?) \|", DOC.read_text(), re.M)
    assert [name for name, _ in rows] == [row.name for row in TABLE]
    assert [becomes for _, becomes in rows] == [row.becomes for row in TABLE]


# ---------------------------------------------------------------- fitting to the backend


def test_memory_per_cpu_follows_the_cpus_the_backend_gives():
    m = mapped(8, mem_mb_per_cpu=1000)
    res, warnings = fit("rule r", m.resources, Capacity(cpus=2, mem_mb=4000), False, m.mem_mb_per_cpu)
    assert (res.cpus, res.mem_mb) == (2, 2000)
    assert len(warnings) == 1


def test_threads_within_capacity_are_untouched():
    res, warnings = fit("rule r", Resources(cpus=2, mem_mb=None), Capacity(cpus=2, mem_mb=10), False)
    assert res == Resources(cpus=2) and warnings == []
