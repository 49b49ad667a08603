"""Helpers shared by the benchmarks: ports, and `pacs-node serve` as a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.ports import free_port as free_port  # noqa: E402 - re-exported
from tests.ports import wait_port as wait_port  # noqa: E402 - re-exported

# The benchmarks' DCMTK processes: without TCP_NODELAY they stall ~45 ms per C-STORE.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def storescu_args(port: int, files: list[Path], aec: str = "LDCT_DENOISE") -> list[str]:
    """DCMTK storescu (the system's, not pynetdicom's app of the same name) sending ``files``."""
    return ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port)] + [
        str(f) for f in files
    ]


def start_node(
    work: Path, port: int, extra: str = "", node: str = "", log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`pacs-node serve` on ``port`` with its data under ``work`` (``node``: more [node] keys,
    ``extra``: more tables, ``log``: where its log goes); returns once it listens."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.toml"
    config.write_text(
        f'[node]\nbind = "127.0.0.1"\nport = {port}\n{node}[storage]\nmin_free_bytes = 0\n{extra}'
    )
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "pacs-node"), "serve", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, timeout=120)
    except RuntimeError:
        proc.kill()
        raise
    return proc
