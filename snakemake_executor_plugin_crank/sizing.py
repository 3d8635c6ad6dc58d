"""Right-sized resources: from what each rule's jobs asked and used (the usage trace's
rows), a hint for each rule that asked far more memory or threads than it used, or that
ran out of memory, and a ``set-resources:``/``set-threads:`` snippet for a profile.

Only jobs that succeeded size a rule down, and only figures that were measured count:
a rule with no measured job gets no hint. Headroom: the suggestion is the most any job
of the rule used, plus a quarter, rounded up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

# a rule is sized down when its jobs used less than this share of what they asked
UNDER = 0.5
HEADROOM = 1.25
# a job shorter than this has too few CPU ticks to judge its threads
MIN_SECONDS_FOR_CPU = 1.0
OUT_OF_MEMORY = "out_of_memory"


@dataclass
class RuleUsage:
    """What a rule's jobs asked for and used at most."""

    rule: str
    jobs: int = 0
    failed: int = 0
    out_of_memory: int = 0
    mem_mb: Optional[float] = None  # the most asked
    peak_mb: Optional[float] = None  # the most used by a job that succeeded
    oom_mem_mb: Optional[float] = None  # the most asked by a job that ran out of memory
    cpus: Optional[float] = None
    cores_used: Optional[float] = None  # the most cpu_s / realtime_s of a job that succeeded
    runtime_min: Optional[float] = None
    realtime_s: Optional[float] = None
    efficiencies: List[float] = field(default_factory=list)  # cpu_s / (realtime_s x cpus)


@dataclass(frozen=True)
class Hint:
    rule: str
    line: str  # what the run says
    resources: Mapping[str, int]  # for set-resources
    threads: Optional[int] = None  # for set-threads


def summarize(rows: Sequence[Mapping[str, Any]]) -> Dict[str, RuleUsage]:
    """Per rule, from the trace's rows (values as the trace holds them: numbers or None)."""
    rules: Dict[str, RuleUsage] = {}
    for row in rows:
        rule = rules.setdefault(row["rule"], RuleUsage(row["rule"]))
        rule.jobs += 1
        rule.mem_mb = _most(rule.mem_mb, row["memory_mb"])
        rule.cpus = _most(rule.cpus, row["cpus"])
        rule.runtime_min = _most(rule.runtime_min, row["runtime_min"])
        if row["status"] == OUT_OF_MEMORY:
            rule.out_of_memory += 1
            rule.oom_mem_mb = _most(rule.oom_mem_mb, row["memory_mb"])
        if row["status"] != "ok":
            rule.failed += 1
            continue
        rule.peak_mb = _most(rule.peak_mb, row["peak_rss_mb"])
        rule.realtime_s = _most(rule.realtime_s, row["realtime_s"])
        cpu_s, real = row["cpu_s"], row["realtime_s"]
        if cpu_s is not None and real and real >= MIN_SECONDS_FOR_CPU:
            rule.cores_used = _most(rule.cores_used, cpu_s / real)
            if row["cpus"]:
                rule.efficiencies.append(cpu_s / (real * row["cpus"]))
    return rules


def hints(rules: Mapping[str, RuleUsage]) -> List[Hint]:
    found = []
    for rule in rules.values():
        if not rule.rule.isidentifier():
            continue  # not a rule ("group x"): set-resources cannot name it
        if rule.out_of_memory:
            asked = rule.oom_mem_mb
            more = {"mem_mb": _round_up(asked * 2)} if asked else {}
            found.append(Hint(rule.rule, (
                f"crank: rule {rule.rule} ran out of memory in {rule.out_of_memory} job(s)"
                + (f" with mem_mb={asked:.0f}: raise it, e.g. mem_mb={more['mem_mb']}" if asked
                   else ": give it mem_mb, more than its jobs hold at once")), more))
            continue
        resources: Dict[str, int] = {}
        said = []
        if rule.mem_mb and rule.peak_mb is not None and rule.peak_mb < UNDER * rule.mem_mb:
            resources["mem_mb"] = _round_up(rule.peak_mb * HEADROOM)
            said.append(f"asked mem_mb={rule.mem_mb:.0f} and used at most {rule.peak_mb:.0f} MB "
                        f"({rule.peak_mb / rule.mem_mb:.0%}): mem_mb={resources['mem_mb']} would do")
        threads = None
        if rule.cpus and rule.cpus > 1 and rule.cores_used is not None and rule.cores_used < UNDER * rule.cpus:
            threads = max(1, math.ceil(rule.cores_used * HEADROOM))
            if threads < rule.cpus:
                said.append(f"asked {rule.cpus:.0f} threads and kept {rule.cores_used:.1f} busy at most: "
                            f"threads={threads} would do")
            else:
                threads = None
        if said:
            found.append(Hint(rule.rule, f"crank: rule {rule.rule} " + "; ".join(said), resources, threads))
    return found


def profile_snippet(found: Sequence[Hint]) -> str:
    """The hints as a Snakemake profile's ``set-resources:`` and ``set-threads:`` (YAML)."""
    lines = ["# what crank suggests from the jobs of this run; add it to a profile's config.yaml"]
    resources = [h for h in found if h.resources]
    if resources:
        lines.append("set-resources:")
        for h in resources:
            lines.append(f"  {_yaml_key(h.rule)}:")
            lines += [f"    {k}: {v}" for k, v in h.resources.items()]
    threads = [h for h in found if h.threads is not None]
    if threads:
        lines.append("set-threads:")
        lines += [f"  {_yaml_key(h.rule)}: {h.threads}" for h in threads]
    return "\n".join(lines) + "\n"


def _most(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if b is None:
        return a
    return b if a is None else max(a, b)


def _round_up(mb: float) -> int:
    step = 100 if mb < 10_000 else 1000
    return max(step, math.ceil(mb / step) * step)


def _yaml_key(name: str) -> str:
    # quoted: a rule called yes, on or null must stay a string
    return json.dumps(name)
