"""Snakemake's threads and resources -> task resources.

Every resource crank reads, including those of snakemake-executor-plugin-slurm, is one row
of ``TABLE``; ``docs/switching-from-slurm.md`` shows the same table (a test keeps the two
equal). Each row names the resource, how its value is read (``KIND``), what it becomes in
the task, and the rule in words. The few rules that combine rows (which CPU count wins,
memory per CPU over total memory, ``gpu`` over ``gres``) are in ``map_job`` and follow the
Slurm plugin, except where a container needs otherwise (then a warning once per rule).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import CrankError
from ..task import Resources

IGNORED = "ignored"


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # how the value is read: a key of KINDS
    becomes: str  # what it sets in the task, or IGNORED
    rule: str  # the rule in words, as the documentation shows it


TABLE: Tuple[Row, ...] = (
    Row("threads", "count", "CPUs", "the CPUs of the task; `threads: 0` gets 1 CPU; more than "
        "the backend has runs with what it has (warned once per rule); `{threads}` is capped at "
        "`--cores` when given, else at those CPUs, as locally"),
    Row("cpus_per_task", "count", "CPUs", "CPUs when larger than `threads`; 0 or less counts as "
        "unset (as in the Slurm plugin)"),
    Row("cpus_per_gpu", "count", "CPUs", "× GPUs -> CPUs when the job has GPUs, no "
        "`cpus_per_task`, and the product is larger than `threads`"),
    Row("mem_mb", "mb", "memory limit", "MB (decimal: 1 MB = 10^6 bytes); 0 means no limit"),
    Row("mem_mb_per_cpu", "mb", "memory limit", "× the CPUs the task gets -> memory; takes "
        "precedence over `mem_mb` (as in the Slurm plugin); 0 counts as unset"),
    Row("disk_mb", "mb", "disk", "MB; 0 means none asked; Docker does not enforce it"),
    Row("runtime", "minutes", "wall-time limit", "minutes (fractions allowed), or `90s`, `30m`, "
        "`2h`, `1d12h`, or Slurm's `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`; 0 means none"),
    Row("gpu", "count", "GPUs", "number of GPUs; wins over a disagreeing `gres`"),
    Row("gres", "gres", "GPUs", "`gpu`, `gpu:N` or `gpu:model:N` -> N GPUs (1 without N) and "
        "the model; any other GRES is ignored"),
    Row("gpu_model", "name", "GPU model", "with `gpu` or `gres=gpu`: the model, in other "
        "executors' spellings too (`nvidia-tesla-p100`, `NVIDIA A100` -> `p100`, `a100`); TES: "
        '`backend_parameters: {"gpu_model": ...}`; Docker: not used; alone it asks for no GPU '
        "and only reaches the command, as `{resources.gpu_model}`, as locally"),
    Row("nodes", "single", IGNORED, "1 is ignored; more than 1 is an error (one container runs "
        "on one machine)"),
    Row("tasks", "single", IGNORED, "1 is ignored; more than 1 (MPI ranks) is an error"),
    Row("tasks_per_node", "single", IGNORED, "1 is ignored; more than 1 (MPI) is an error"),
    Row("slurm_partition", "any", IGNORED, "ignored"),
    Row("slurm_account", "any", IGNORED, "ignored"),
    Row("qos", "any", IGNORED, "ignored"),
    Row("constraint", "any", IGNORED, "ignored"),
    Row("slurm_extra", "any", IGNORED, "ignored"),
    Row("clusters", "any", IGNORED, "ignored (also `cluster`, `slurm_cluster`)"),
    Row("cluster", "any", IGNORED, "ignored"),
    Row("slurm_cluster", "any", IGNORED, "ignored"),
    Row("slurm_requeue", "any", IGNORED, "ignored"),
    Row("tasks_per_gpu", "any", IGNORED, "ignored"),
)

ROWS: Dict[str, Row] = {row.name: row for row in TABLE}

# Slurm's GRES syntax, as the Slurm plugin checks it: name[:type][:count[TGM]]
GRES = re.compile(r"^[a-zA-Z0-9_]+(:[a-zA-Z0-9_.]+)?(:\d+[TGM]?)?$")
GPU_MODEL = re.compile(r"^[a-z0-9_.]+$")
# words of other executors' spellings that name no model: the Kubernetes and Google Batch
# executors take accelerator types such as "nvidia-tesla-p100" or "nvidia-a100-80gb"
GPU_VENDOR_WORDS = frozenset({"nvidia", "amd", "intel", "tesla"})


def _unset(value: Any) -> bool:
    # "<TBD>": Snakemake leaves some resources to be decided on the remote side
    return value is None or value == "" or (isinstance(value, str) and value.startswith("<"))


def _number(what: str, name: str, value: Any, whole: bool) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise CrankError(
            f"{what}: resource {name}={value!r} is not a number; give a whole number"
        ) from None
    if not math.isfinite(number) or (whole and number != int(number)):
        raise CrankError(f"{what}: resource {name}={value!r} must be a whole number >= 0")
    return number


def _count(what: str, name: str, value: Any) -> int:
    """A whole number; negative values are kept for the rules that give them a meaning."""
    return int(_number(what, name, value, whole=True))


def _mb(what: str, name: str, value: Any) -> Optional[int]:
    number = _number(what, name, value, whole=True)
    if number < 0:
        raise CrankError(f"{what}: resource {name}={value!r} must be a whole number >= 0")
    return int(number) or None  # 0: no limit


_UNITS = {"d": 1440.0, "h": 60.0, "m": 1.0, "s": 1 / 60}
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def _minutes(what: str, name: str, value: Any) -> Optional[float]:
    if isinstance(value, str) and not re.fullmatch(r"\s*[\d.]+\s*", value):
        text = value.strip().lower()
        minutes = None
        m = _SLURM_TIME.match(text)
        if m and (":" in text or "-" in text):
            days, first, second, third = m.groups()
            d = int(days or 0)
            if days is not None:  # D-H, D-H:M, D-H:M:S
                h, mi, s = int(first), int(second or 0), int(third or 0)
            elif third is not None:  # H:M:S
                h, mi, s = int(first), int(second), int(third)
            else:  # M:S (sbatch --time)
                h, mi, s = 0, int(first), int(second)
            minutes = d * 1440 + h * 60 + mi + s / 60
        elif re.fullmatch(r"(\s*\d+(\.\d+)?\s*[dhms])+\s*", text):
            minutes = sum(
                float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text)
            )
        if minutes is None:
            raise CrankError(
                f"{what}: resource {name}={value!r} is not a duration; give minutes "
                "(e.g. 90), '1h30m', or Slurm's 'H:M:S' or 'D-H:M:S'"
            )
        return minutes or None
    number = _number(what, name, value, whole=False)
    if number < 0:
        raise CrankError(f"{what}: resource {name}={value!r} must be a number of minutes >= 0")
    return number or None  # 0: no limit


def _gres(what: str, name: str, value: Any) -> Tuple[str, Optional[str], int]:
    text = str(value)
    if not GRES.match(text):
        raise CrankError(
            f"{what}: resource {name}={value!r} is not a GRES; give 'gpu', 'gpu:N' or "
            "'gpu:model:N'"
        )
    parts = text.split(":")
    kind, model, count = parts[0], None, 1
    if len(parts) == 3:
        model, count = parts[1], parts[2]
    elif len(parts) == 2:
        if parts[1].isdigit():
            count = parts[1]
        else:
            model = parts[1]
    return kind, model, int(str(count).rstrip("TGM"))


def gpu_model_name(value: Any) -> Optional[str]:
    """A GPU model as Slurm's GRES types and crank write it (``a100``, ``a100_80gb``), from
    other executors' spellings: case, vendor words, dashes and spaces
    (``nvidia-tesla-p100`` -> ``p100``); None when no model name remains."""
    words = [w for w in re.split(r"[\s_-]+", str(value).strip().lower()) if w]
    kept = [w for w in words if w not in GPU_VENDOR_WORDS] or words[-1:]
    text = "_".join(kept)
    return text if GPU_MODEL.match(text) else None


def _name(what: str, name: str, value: Any) -> Any:
    # checked only where a GPU is asked for (map_job): alone, any string is the command's
    return value


def _single(what: str, name: str, value: Any) -> int:
    number = _count(what, name, value)
    if number > 1:
        raise CrankError(
            f"{what}: resource {name}={number} asks for a multi-node or MPI job, which crank "
            f"cannot run: a container is one task on one machine; remove {name} or set it to 1"
        )
    return number


KINDS: Dict[str, Callable[[str, str, Any], Any]] = {
    "count": _count,
    "mb": _mb,
    "minutes": _minutes,
    "gres": _gres,
    "name": _name,
    "single": _single,
    "any": lambda what, name, value: value,
}


@dataclass(frozen=True)
class Mapped:
    """A job's resources as crank uses them, and what to say about them."""

    resources: Resources
    mem_mb_per_cpu: Optional[int] = None  # memory follows the CPUs the task finally gets
    warnings: Tuple[str, ...] = ()  # disagreements, worded the same for every job of a rule
    ignored: Tuple[str, ...] = ()  # names with no meaning in a container (reported once a run)


def map_job(
    what: str, threads: Any, resources: Mapping[str, Any], preemptible: bool = False
) -> Mapped:
    """Map a job's threads and resources to task resources. ``what`` names the job in
    errors and warnings ("rule x")."""
    values: Dict[str, Any] = {}
    ignored: List[str] = []
    for row in TABLE:
        raw = threads if row.name == "threads" else resources.get(row.name)
        if _unset(raw):
            continue
        values[row.name] = KINDS[row.kind](what, row.name, raw)
        if row.becomes == IGNORED:
            ignored.append(row.name)
    warnings: List[str] = []

    asked_threads = values.get("threads")
    if asked_threads is not None and asked_threads < 0:
        raise CrankError(f"{what}: threads={threads!r} must be a whole number >= 0")

    # GPUs: gpu, else gres=gpu[:model][:N]
    gpus = values.get("gpu")
    if gpus is not None and gpus < 0:
        raise CrankError(f"{what}: resource gpu={gpus} must be a whole number >= 0")
    model = values.get("gpu_model")
    if "gres" in values:
        kind, gres_model, gres_count = values["gres"]
        if kind != "gpu":
            ignored.append("gres")
        else:
            if gpus is not None and gpus != gres_count:
                warnings.append(
                    f"{what}: gpu={gpus} and gres=gpu:{gres_count} disagree; "
                    f"the task gets gpu={gpus} GPUs"
                )
            gpus = gres_count if gpus is None else gpus
            model = model or gres_model
    # gpu_model alone asks for no GPU (as locally, and as profiles written for other
    # executors expect): the string only reaches the command as {resources.gpu_model}
    gpus = gpus or 0
    if gpus and model is not None:
        name = gpu_model_name(model)
        if name is None:
            raise CrankError(
                f"{what}: resource gpu_model={model!r} is not a GPU model name; give one such "
                "as a100 or nvidia-tesla-p100"
            )
        model = name
    else:
        model = None

    # CPUs: the largest of threads, cpus_per_task, cpus_per_gpu × GPUs; at least 1
    cpus = asked_threads or 1
    per_task = values.get("cpus_per_task", 0)
    if per_task > 0:
        if asked_threads is not None and asked_threads > per_task:
            warnings.append(
                f"{what}: threads={asked_threads} is more than cpus_per_task={per_task}; "
                f"the task gets {asked_threads} CPUs (Slurm would give {per_task})"
            )
        cpus = max(cpus, per_task)
    elif gpus and values.get("cpus_per_gpu", 0) > 0:
        cpus = max(cpus, values["cpus_per_gpu"] * gpus)

    # memory: mem_mb_per_cpu × CPUs takes precedence over mem_mb, silently as in the Slurm
    # plugin: Snakemake gives every rule a default mem_mb as soon as a profile sets any
    # default resource, so a warning would be printed for every rule of every such profile
    mem_mb = values.get("mem_mb")
    per_cpu = values.get("mem_mb_per_cpu")
    if per_cpu:
        mem_mb = per_cpu * cpus

    minutes = values.get("runtime")
    return Mapped(
        resources=Resources(
            cpus=cpus,
            mem_mb=mem_mb,
            disk_mb=values.get("disk_mb"),
            runtime_s=max(1, round(minutes * 60)) if minutes else None,
            gpus=gpus,
            preemptible=preemptible,
            gpu_model=model,
        ),
        mem_mb_per_cpu=per_cpu,
        warnings=tuple(warnings),
        ignored=tuple(ignored),
    )


def from_snakemake(
    what: str, threads: Any, resources: Mapping[str, Any], preemptible: bool = False
) -> Resources:
    """The task resources of ``map_job``, without the notes."""
    return map_job(what, threads, resources, preemptible).resources


def ignored_names(names: Iterable[str]) -> List[str]:
    """Of these resource names, those ignored in a container whatever their value, sorted."""
    return sorted({n for n in names if n in ROWS and ROWS[n].kind == "any"})
