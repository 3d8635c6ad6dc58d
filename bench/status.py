"""Cost of one status round for N running containers: crank's poll() (one list request
for the whole run) vs. one inspect request per container.

For N = 1, 10, 50: start N `sleep 600` busybox containers with DockerBackend, time
poll() 20 times and the per-container inspects 20 times, print the medians and their
ratio. Every container made is removed (backend.close()), also on error or Ctrl-C.
Needs the test images (bash scripts/setup.sh). Run: python3 bench/status.py
"""

import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snakemake_executor_plugin_crank.backends.docker import DockerBackend, DockerOptions  # noqa: E402
from snakemake_executor_plugin_crank.task import State, TaskSpec  # noqa: E402

IMAGE = "crank-test/busybox:1"
COUNTS = (1, 10, 50)
ROUNDS = 20


def median_ms(action):
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def measure(n, workdir):
    backend = DockerBackend(uuid.uuid4().hex, workdir, DockerOptions(pull="never"))
    try:
        handles = [
            backend.submit(TaskSpec(name=f"sleep-{i}", label="rule sleep", job_id=str(i), attempt=1,
                                    image=IMAGE, script="sleep 600", workdir=workdir,
                                    log_dir=workdir))
            for i in range(n)
        ]
        states = backend.poll(handles)
        assert all(s is State.RUNNING for s in states.values()), states
        poll = median_ms(lambda: backend.poll(handles))
        inspect = median_ms(lambda: [backend.api.inspect_container(h) for h in handles])
        return poll, inspect
    finally:
        backend.close()


def main():
    print(f"one status round, median of {ROUNDS} (ms)")
    print(f"{'containers':>10} {'poll()':>8} {'inspect each':>13} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="crank-bench-") as workdir:
        for n in COUNTS:
            poll, inspect = measure(n, workdir)
            print(f"{n:>10} {poll:8.1f} {inspect:13.1f} {inspect / poll:5.1f}x")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (the containers were removed)")
