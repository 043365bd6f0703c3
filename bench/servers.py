"""The servers a serving benchmark compares, started one at a time on 127.0.0.1: `expo-serve
serve` and the anchor a user would pick, `transformers serve --continuous-batching`. While one
works, its memory is sampled: the peak RSS of its whole process tree (from /proc)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"expo-serve: serving \S+ at (http://\S+)")


@dataclass
class Server:
    name: str
    model: str  # what requests send as `model`
    process: subprocess.Popen
    url: str
    log: Path
    peak_rss: int = 0
    _sampler: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def watch_memory(self, interval_s: float = 0.2) -> None:
        """Sample the tree's RSS until stop(); the peak lands in `peak_rss`."""
        def sample():
            while not self._stop.wait(interval_s):
                self.peak_rss = max(self.peak_rss, tree_rss(self.process.pid))
        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sampler:
            self._sampler.join()
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        rss[int(entry.name)] = int(found.group(1)) * 1024 if found else 0
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo += children.get(current, [])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_expo(name: str, model_args: list[str], log: Path, *options: str, timeout_s: float = 900) -> Server:
    """`expo-serve serve` on a free port, serving its model as `bench`; returns once it listens."""
    command = [sys.executable, "-m", "expo_serve", "serve", *model_args, "--host", "127.0.0.1", "--port", "0",
               "--model-name", "bench", "--log-level", "warning", *options]
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        found = BANNER.search(log.read_text())
        if found:
            return Server(name, "bench", process, found.group(1), log)
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{name} did not start within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def start_transformers(name: str, model_dir: Path, log: Path, *, timeout_s: float = 900) -> Server:
    """`transformers serve --continuous-batching` with the model preloaded, on the CPU in float32."""
    import httpx

    port = free_port()
    command = [str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching", "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32", "--log-level", "warning", str(model_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return Server(name, str(model_dir), process, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{name} did not start:\n{log.read_text()[-3000:]}")
