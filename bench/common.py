"""Helpers shared by the benchmarks: ports, and `pacs-node serve` as a child process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def start_node(work: Path, port: int, extra: str = "") -> subprocess.Popen[bytes]:
    """`pacs-node serve` on ``port`` with its data under ``work``; returns once it listens."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.toml"
    config.write_text(
        f'[node]\nbind = "127.0.0.1"\nport = {port}\n[storage]\nmin_free_bytes = 0\n{extra}'
    )
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "pacs-node"), "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
    except RuntimeError:
        proc.kill()
        raise
    return proc
