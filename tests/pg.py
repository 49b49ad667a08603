"""A throw-away PostgreSQL server for the tests: initdb into a temporary folder, a free loopback
port, trust authentication. Runs as the ``postgres`` system user when the tests run as root
(PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import free_port, port_open, wait_for


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise AssertionError("PostgreSQL is not installed: run ./install.sh --test")
    return found[-1]


class PostgresServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pacs-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")

    def start(self) -> PostgresServer:
        data = self.dir / "data"
        subprocess.run(
            [
                *self.as_user,
                _bin("initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "pacs",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.proc = subprocess.Popen(
            [
                *self.as_user,
                _bin("postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-h",
                "127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "log", "ab"),  # noqa: SIM115
        )
        wait_for(lambda: port_open(self.port), 60, "PostgreSQL")
        return self

    def create_db(self, name: str) -> str:
        subprocess.run(
            [_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "pacs", name],
            check=True,
            capture_output=True,
        )
        return f"postgresql+psycopg://pacs@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Fast shutdown: open sessions are cut, as when a database server goes away."""
        if self.proc and self.proc.poll() is None:
            subprocess.run(
                [
                    *self.as_user,
                    _bin("pg_ctl"),
                    "-D",
                    str(self.dir / "data"),
                    "stop",
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                ],
                capture_output=True,
            )
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
