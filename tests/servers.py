"""Start real SGLang servers (plain or sglang-vase) on loopback for the end-to-end tests."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import requests

# Every server runs SGLang's memory checks: free + held slots must equal the pool at every step
# (busy) and when idle, and no slot a request holds may be on the free list.
STRICT_MEMORY_ENV = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
}
# Plain SGLang on the CPU route, as sglang_vase.launch_server sets it up.
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph", "--sleep-on-idle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process; ``vase=False`` starts plain ``sglang.launch_server`` with the same flags."""

    def __init__(self, args: list[str], vase: bool = True, env: dict | None = None, timeout: float = 240):
        from sglang_vase.models import prepare_default_model

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        module = "sglang_vase.launch_server" if vase else "sglang.launch_server"
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *args]
        if "--model-path" not in args:
            cmd += ["--model-path", prepare_default_model()]
        if not vase:
            cmd += CPU_FLAGS + ["--disable-overlap-schedule"]
        full_env = {**os.environ, **STRICT_MEMORY_ENV, **(env or {})}
        full_env.pop("TRITON_INTERPRET", None)  # serving on CPU uses the torch path, not the interpreter
        if not vase:
            full_env["SGLANG_USE_CPU_ENGINE"] = "1"
            full_env.pop("SGLANG_VASE_CONFIG", None)
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix=f"server-{self.port}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=tempfile.gettempdir(), start_new_session=True)
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server did not start in {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        with open(self.log_file.name) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def generate(self, text, max_new_tokens=32, vase=None, timeout=600, extra=None, **sampling) -> dict:
        """Greedy by default; ``sampling`` goes into sampling_params, ``extra`` into the body."""
        body = {**({"text": text} if text is not None else {}), "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, **sampling},
                **(extra or {})}
        if vase is not None:
            body["sampling_params"]["custom_params"] = {"vase": vase}
        r = requests.post(f"{self.url}/generate", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def max_running_requests(self) -> int:
        """Most requests decoding at once, from SGLang's own decode log lines."""
        counts = [int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", self.log())]
        return max(counts, default=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log_file.close()
