"""Start and wait for SGLang servers (plain or sglang-vase) and sglang-router on loopback: one copy
for the tests, the benchmarks and the soak run.

    server = Server(["--max-total-tokens", "8192"])          # sglang-vase, embedded model
    plain = Server(["--max-total-tokens", "8192"], vase=False)  # plain SGLang, same flags
    server.generate("Hello", max_new_tokens=16); server.stop()
    router = Router([a.url, b.url], ["--policy", "round_robin"])  # in front of two servers

Plain SGLang gets the CPU route exactly as ``sglang_vase.launch_server`` sets it up when no GPU is
visible (``launch_server.CPU_FLAGS``), so both systems differ only by eviction.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sglang_vase.launch_server import CPU_ENV, CPU_FLAGS

# SGLang's memory checks: free + held slots must equal the pool at every step (busy) and when
# idle, and no slot a request holds may be on the free list.
STRICT_MEMORY_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
}
_DECODE_RUNNING_RE = re.compile(r"Decode batch(?: \[\d+\])?, #running-req: (\d+)")


# Ports come from below the kernel's ephemeral range (32768+ here), where no outgoing connection of
# another process can take them between our check and the server's bind, and from under SGLang's own
# range for its NCCL/TCPStore ports (22000-29999), so two servers never draw from one pool.
_PORT_RANGE = (10000, 21999)
# A server whose HTTP port was taken anyway logs this and then hangs in shutdown instead of exiting.
_PORT_TAKEN = "address already in use"
_START_ATTEMPTS = 3


def free_port() -> int:
    for port in random.sample(range(_PORT_RANGE[0], _PORT_RANGE[1] + 1), 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


def _environment(changes: dict | None) -> dict:
    """This process's environment with ``changes``; a variable whose value is None is removed."""
    env = {**os.environ, **(changes or {})}
    return {k: v for k, v in env.items() if v is not None}


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _pdeathsig():
    """A callable the child runs before exec (Linux): SIGTERM it when the thread that started it
    ends, the process included, even by SIGKILL. A killed benchmark or test never leaves a server
    holding gigabytes of KV pool behind (an orphaned 1.5B server once pushed a long run out of
    memory). Everything is looked up here, in the parent: the forked child of a threaded process
    must not import or dlopen. A parent already gone by then would never signal: the child exits."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def child() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return child


class _Process:
    """A loopback HTTP service in its own process group, its log in a file; ``wait_ready`` polls
    ``/health``, ``stop`` is idempotent. It lives no longer than the thread that started it."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path | None, wait: bool, timeout: float):
        """``cmd`` without ``--host``/``--port``: those are added for a free loopback port."""
        self._base_cmd, self._env = cmd, env
        self._lock = threading.Lock()
        if log_path is None:
            log_path = Path(tempfile.mkstemp(prefix=f"{type(self).__name__.lower()}-", suffix=".log")[1])
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self._start_attempts = 0
        self._launch()
        if wait:
            self.wait_ready(timeout)

    def _launch(self) -> None:
        self._start_attempts += 1
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*self._base_cmd[:3], "--host", "127.0.0.1", "--port", str(self.port), *self._base_cmd[3:]]
        self._log_start = self.log_offset()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env,
                                     cwd=tempfile.gettempdir(), start_new_session=True, preexec_fn=_pdeathsig())

    def _relaunch_if_port_taken(self) -> bool:
        """Another process can still bind the port between our check and the server's bind; the
        server then never answers. Start it again on another port (the log keeps both attempts)."""
        if self._start_attempts >= _START_ATTEMPTS or _PORT_TAKEN not in self.log(self._log_start).lower():
            return False
        self._kill()
        self._log.write(f"\n--- port {self.port} was taken; starting again on another port ---\n")
        self._launch()
        return True

    def wait_ready(self, timeout: float = 300, cancel: threading.Event | None = None) -> float:
        """Seconds until /health answered; raises with the log's tail if the process died or hung."""
        import requests

        t0 = time.time()
        while time.time() - t0 < timeout:
            if cancel is not None and cancel.is_set():
                raise RuntimeError("cancelled")
            if self._relaunch_if_port_taken():
                continue
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[2]} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.time() - t0
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"{self.cmd[2]} did not start in {timeout}s:\n{self.log()[-4000:]}")

    def log(self, start: int = 0) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(start)
            return f.read()

    def log_offset(self) -> int:
        self._log.flush()
        return os.path.getsize(self.log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        with self._lock:
            self._kill()
            if not self._log.closed:
                self._log.close()


class Server(_Process):
    """A server process. ``vase=False`` starts plain ``sglang.launch_server``.

    The model defaults to the embedded one; ``cuda=None`` asks torch whether a GPU is visible.
    ``strict_memory`` turns SGLang's memory checks on (``STRICT_MEMORY_ENV``); ``env`` changes the
    environment it inherits (None removes a variable). ``wait=True`` returns
    once /health answers (``wait_ready`` otherwise); ``stop`` is idempotent.
    """

    def __init__(self, args: list[str], vase: bool = True, env: dict | None = None, log_path: Path | None = None,
                 cuda: bool | None = None, wait: bool = True, timeout: float = 300, strict_memory: bool = False):
        self.vase = vase
        module = "sglang_vase.launch_server" if vase else "sglang.launch_server"
        cmd = [sys.executable, "-m", module, *args]
        if not _has_flag(args, "--model-path"):
            from sglang_vase.models import prepare_default_model

            cmd += ["--model-path", prepare_default_model()]
        # Not inherited (``env`` may still set them): a server runs the torch path on CPU, not the
        # Triton interpreter a test process may have on; plain SGLang reads no eviction settings.
        dropped = {"TRITON_INTERPRET": None, **({} if vase else {"SGLANG_VASE_CONFIG": None})}
        full_env = _environment({**dropped, **(STRICT_MEMORY_ENV if strict_memory else {}), **(env or {})})
        if not vase:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                full_env.update(CPU_ENV)
                cmd += [x for flag, value in CPU_FLAGS if not _has_flag(args, flag)
                        for x in ((flag,) if value is None else (flag, value))]
        super().__init__(cmd, full_env, log_path, wait, timeout)

    def generate(self, text=None, max_new_tokens: int = 32, vase=None, timeout: float = 600, extra: dict | None = None,
                 input_ids: list[int] | None = None, **sampling) -> dict:
        """POST /generate, greedy unless ``sampling`` says otherwise; ``vase`` goes into
        ``custom_params``, ``extra`` into the body. Raises on an HTTP error."""
        import requests

        body = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, **sampling}, **(extra or {})}
        if text is not None:
            body["text"] = text
        if input_ids is not None:
            body["input_ids"] = input_ids
        if vase is not None:
            body["sampling_params"]["custom_params"] = {"vase": vase}
        r = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"request failed ({r.status_code}): {r.text[:1000]}")
        return r.json()

    def used_tokens(self) -> float:
        """KV slots in use, from SGLang's ``sglang:num_used_tokens`` gauge (needs --enable-metrics)."""
        import requests

        metrics = requests.get(f"{self.url}/metrics", timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("sglang:num_used_tokens")]
        if not values:
            raise RuntimeError("no sglang:num_used_tokens gauge (start the server with --enable-metrics)")
        return sum(values)

    def max_running_requests(self, start: int = 0) -> int:
        """Most requests decoding at once, from SGLang's decode log lines (from log offset ``start``)."""
        return max((int(m) for m in _DECODE_RUNNING_RE.findall(self.log(start))), default=0)


class Router(_Process):
    """sglang-router (``python -m sglang_router.launch_router``) in front of ``worker_urls``."""

    def __init__(self, worker_urls: list[str], args: list[str] = (), env: dict | None = None,
                 log_path: Path | None = None, wait: bool = True, timeout: float = 120):
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, *args]
        self.worker_urls = list(worker_urls)
        super().__init__(cmd, _environment(env), log_path, wait, timeout)

    def wait_ready(self, timeout: float = 120, cancel: threading.Event | None = None) -> float:
        """Also wait until every worker is registered: the router answers /health at once and
        registers its workers in the background (requests before that get a 503)."""
        import requests

        t0 = time.time()
        super().wait_ready(timeout, cancel)
        while time.time() - t0 < timeout:
            listed = requests.get(f"{self.url}/workers", timeout=5).text
            if all(url in listed for url in self.worker_urls):
                return time.time() - t0
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"the router did not register {self.worker_urls} in {timeout}s:\n{self.log()[-4000:]}")
