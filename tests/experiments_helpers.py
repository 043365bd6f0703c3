"""Helpers for the experiments tests: a throwaway PostgreSQL cluster, the standalone server
(experiments_standalone.py) as a subprocess on a free loopback port, and the simulated users of
bench/ (simulate.py: a population with a known preference; live_run.py: it chatting through the
openai client)."""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))

from live_run import run as live_run  # noqa: E402  (bench/live_run.py)
from simulate import Population, drive_service, population_mean  # noqa: E402  (bench/simulate.py)

__all__ = ["Population", "PostgresCluster", "StandaloneServer", "drive_service", "free_port", "live_run",
           "population_mean", "postgres_bin", "shared_postgres"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries, or None when the package is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    """initdb + pg_ctl in a temporary folder, listening on 127.0.0.1 only.

    PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
    """

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="expo-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.running = False

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> "PostgresCluster":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on "
                   "-c max_connections=100 -c shared_buffers=32MB")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", options, "start")
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self) -> str:
        """A fresh, empty database on the cluster; returns its URL."""
        import psycopg

        name = f"t{time.time_ns()}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name


_SHARED: PostgresCluster | None = None


def shared_postgres() -> PostgresCluster:
    """One cluster per test process, started on first use and stopped at exit."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PostgresCluster().start()
        atexit.register(_SHARED.stop)
    return _SHARED


class StandaloneServer:
    """experiments_standalone.py as a subprocess on a free loopback port."""

    def __init__(self, db_url: str, experiments_file: str | None = None, admin_key: str | None = "admin-secret",
                 placeholder_battles: bool = True, refresh_interval: float = 5.0, log_path: str | None = None):
        self.db_url = db_url
        self.experiments_file = experiments_file
        self.admin_key = admin_key
        self.placeholder_battles = placeholder_battles
        self.refresh_interval = refresh_interval
        self.log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="expo-standalone-"), "server.log")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "StandaloneServer":
        cmd = [sys.executable, str(Path(__file__).with_name("experiments_standalone.py")), "--db", self.db_url,
               "--port", str(self.port), "--refresh-interval", str(self.refresh_interval)]
        if self.experiments_file:
            cmd += ["--experiments", self.experiments_file]
        if self.admin_key:
            cmd += ["--admin-key", self.admin_key]
        if self.placeholder_battles:
            cmd.append("--placeholder-battles")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"standalone server exited: {Path(self.log_path).read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"standalone server did not come up: {Path(self.log_path).read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing queued gets flushed."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "StandaloneServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
