"""The archives of --crank-docker-files copy, without an engine: what goes into a container
(every kind of entry, exact modes and times) and what is let out of one (nothing outside the
product, nothing through a link)."""

import io
import os
import tarfile

import pytest

from snakemake_executor_plugin_crank.backends.docker import copying
from snakemake_executor_plugin_crank.backends.stamps import nanoseconds
from snakemake_executor_plugin_crank.errors import CrankError
from snakemake_executor_plugin_crank.task import Input, Output, TaskSpec


def test_rfc3339_times_keep_every_nanosecond():
    assert nanoseconds("2026-12-04T08:14:05.228426739Z") == 1796372045228426739
    assert nanoseconds("1970-01-01T01:00:00.1+01:00") == 100_000_000
    assert nanoseconds("1970-01-24T03:33:20Z") == 2_000_000_000_000_000


def task_in(workdir, **fields):
    return TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i", script="true",
                    workdir=str(workdir), **fields)


def members(task, crank_files=()):
    data = b"".join(copying.files_in(task, crank_files))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {"/" + m.name: m for m in tar.getmembers()}, tar


def test_inputs_go_in_as_they_are_with_the_directories_on_the_way(tmp_path):
    work = tmp_path / "wf"
    (work / "data").mkdir(parents=True)
    (work / "data" / "tool.sh").write_text("echo\n")
    os.chmod(work / "data" / "tool.sh", 0o750)
    os.utime(work / "data" / "tool.sh", ns=(0, 1_500_000_000_123_456_789))
    (work / "link").symlink_to("data/tool.sh")
    task = task_in(work, inputs=(Input(str(work / "link")),), outputs=(Output(str(work / "out" / "x")),))
    (work / "out").mkdir()
    found, _ = members(task)
    tool = found[str(work / "data" / "tool.sh")]
    assert tool.isreg() and tool.mode == 0o750 and tool.size == 5
    assert tool.pax_headers["mtime"] == "1500000000.123456789"
    assert found[str(work / "link")].issym() and found[str(work / "link")].linkname == "data/tool.sh"
    for directory in (tmp_path, work, work / "data", work / "out"):  # the job writes its output there
        assert found[str(directory)].isdir()
    names = list(found)
    assert names.index(str(work / "data")) < names.index(str(work / "data" / "tool.sh"))


def test_a_missing_input_is_said_before_anything_is_sent(tmp_path):
    task = task_in(tmp_path, inputs=(Input(str(tmp_path / "nope")),))
    with pytest.raises(CrankError, match="no such file"):
        copying.files_in(task)


def archive(*entries):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, kind, extra in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                info.linkname = extra
                tar.addfile(info)
            else:
                info.size = len(extra)
                tar.addfile(info, io.BytesIO(extra))
    return [data.getvalue()]


def test_what_comes_out_stays_inside_the_product_and_never_goes_through_a_link(tmp_path):
    dest = tmp_path / "w" / "out.d"
    got = (archive(("out.d", tarfile.DIRTYPE, b""), ("out.d/ok", tarfile.REGTYPE, b"ok"),
                   ("out.d/up", tarfile.SYMTYPE, "/etc"), ("out.d/up/passwd", tarfile.REGTYPE, b"x"),
                   ("out.d/../escape", tarfile.REGTYPE, b"x"), ("other", tarfile.REGTYPE, b"x"),
                   ("out.d/hard", tarfile.LNKTYPE, "/etc/passwd")),
           {"name": "out.d", "mtime": "2026-12-04T08:14:05.228426739Z"})
    links = copying.take(got, str(dest))
    assert sorted(os.listdir(dest)) == ["ok", "up"]
    assert (dest / "ok").read_bytes() == b"ok" and os.readlink(dest / "up") == "/etc"
    assert not (tmp_path / "w" / "escape").exists() and not (tmp_path / "w" / "other").exists()
    assert links == [(str(dest / "up"), "/etc")]
    assert os.stat(dest).st_mtime_ns == 1796372045228426739
    assert [p for p in os.listdir(tmp_path / "w") if p != "out.d"] == []  # nothing left beside it
