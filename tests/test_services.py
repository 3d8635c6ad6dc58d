"""tests/services.py: what a session did not start, it leaves running; a pid file never makes it
signal another program that got the same pid."""

import socket

import services


def test_a_running_server_is_reused_and_left_running(s3):
    with services.seaweedfs() as kept:
        assert kept.values["AWS_ENDPOINT_URL"] == s3.endpoint
        assert not kept.started
    assert services.port_open(services.S3_PORT)
    services.SeaweedFS().create_bucket()  # still answers, with the same credentials


def test_a_pid_file_names_its_process(tmp_path):
    daemon = services.Daemon("sleep", tmp_path / "sleep.pid")
    proc = daemon.start(["sleep", "60"], tmp_path / "sleep.log")
    try:
        assert services.recorded_pid(daemon.pid_file, "sleep") == proc.pid
        other = tmp_path / "other.pid"
        other.write_text(f"{proc.pid} weed\n")  # the pid now belongs to another program
        assert services.recorded_pid(other, "weed") is None
        services.Daemon("weed", other).stop()
        assert proc.poll() is None
    finally:
        daemon.stop()
    assert proc.returncode is not None and not daemon.pid_file.exists()



def test_a_server_that_died_is_started_again_with_one_line(tmp_path):
    port = free_port()
    daemon = services.Daemon("python3", tmp_path / "web.pid")
    argv = ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)]

    def ensure() -> bool:
        if services.port_open(port):
            return False
        daemon.start(argv, tmp_path / "web.log")
        assert services.wait_until(lambda: services.port_open(port), 30)
        return True

    kept = services.Kept("web", lambda: services.port_open(port), ensure, daemon, tmp_path / "web.log")
    try:
        assert kept.started and kept.revive() is None
        daemon.stop()
        assert not services.port_open(port)
        line = kept.revive()
        assert line.startswith("web had stopped answering (its log: ") and line.endswith(
            "started again for the next test")
        assert services.port_open(port)
    finally:
        kept.close()
    assert not services.port_open(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
