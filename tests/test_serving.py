"""The server starter survives a port that another process takes between our check and the bind
(CI lost a 42-minute run to exactly that): it starts the service again on another port. A service
dies with the process that started it."""

import os
import socket
import subprocess
import sys
import textwrap
import time

from sglang_vase import serving

APP = textwrap.dedent("""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
""")


def test_taken_port_is_retried_on_another(tmp_path, monkeypatch):
    (tmp_path / "health_app.py").write_text(APP)
    taken = socket.socket()
    taken.bind(("127.0.0.1", serving.free_port()))
    taken.listen()
    taken_port = taken.getsockname()[1]
    draws = iter([taken_port])
    real_free_port = serving.free_port
    monkeypatch.setattr(serving, "free_port", lambda: next(draws, None) or real_free_port())
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(tmp_path), "health_app:app"]
    service = serving._Process(cmd, env={}, log_path=tmp_path / "service.log", wait=False, timeout=60)
    try:
        assert service.port == taken_port
        service.wait_ready(60)
        assert service.port != taken_port and service._start_attempts == 2
        log = service.log()
        assert "address already in use" in log.lower() and f"port {taken_port} was taken" in log
    finally:
        service.stop()
        taken.close()


def test_free_ports_avoid_the_ephemeral_and_sglang_ranges():
    ports = {serving.free_port() for _ in range(20)}
    assert all(10000 <= p < 22000 for p in ports)


def test_server_environment_changes_and_removals(monkeypatch):
    monkeypatch.setenv("VASE_TEST_KEPT", "a")
    monkeypatch.setenv("VASE_TEST_DROPPED", "b")
    env = serving._environment({"VASE_TEST_DROPPED": None, "VASE_TEST_ADDED": "c"})
    assert env["VASE_TEST_KEPT"] == "a" and env["VASE_TEST_ADDED"] == "c" and "VASE_TEST_DROPPED" not in env


def test_servers_do_not_inherit_the_interpreter_or_eviction_settings_unless_asked(monkeypatch):
    """The environment a Server starts with (the process start itself is what other tests run)."""
    started = []
    monkeypatch.setattr(serving._Process, "__init__", lambda self, cmd, env, *a: started.append(env))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SGLANG_VASE_CONFIG", "{}")
    model = ["--model-path", "m"]
    serving.Server(model)
    serving.Server(model, vase=False, cuda=True)
    serving.Server(model, env={"TRITON_INTERPRET": "1"})
    vase, plain, asked = started
    assert "TRITON_INTERPRET" not in vase and vase["SGLANG_VASE_CONFIG"] == "{}"
    assert "TRITON_INTERPRET" not in plain and "SGLANG_VASE_CONFIG" not in plain
    assert asked["TRITON_INTERPRET"] == "1"


def test_a_service_dies_with_the_process_that_started_it(tmp_path):
    """Even a SIGKILLed parent leaves no service behind (an orphaned 1.5B server once pushed a long
    run out of memory). SGLang's launcher takes its scheduler and detokenizer with it on SIGTERM
    (checked by hand with the embedded model: the whole group gone 7 s after the parent)."""
    starter = textwrap.dedent(f"""
        import sys
        from sglang_vase import serving
        service = serving._Process([sys.executable, "-c", "import time; time.sleep(600)"], env={{}},
                                   log_path={str(tmp_path / "s.log")!r}, wait=False, timeout=0)
        print(service.proc.pid, flush=True)
        import time; time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    os.kill(pid, 0)  # running
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":  # exited, its zombie awaits init
                return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)  # leave no orphan behind a failure
    raise AssertionError(f"service {pid} outlived its parent")
