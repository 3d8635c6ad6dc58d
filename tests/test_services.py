"""tests/services.py: what a session did not start, it leaves running; a pid file never makes it
signal another program that got the same pid."""

import services


def test_a_running_server_is_reused_and_left_running(s3):
    with services.seaweedfs() as values:
        assert values["AWS_ENDPOINT_URL"] == s3.endpoint
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

