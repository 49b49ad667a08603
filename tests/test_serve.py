"""`pacs-node serve`: starts, answers DCMTK's echoscu, stops cleanly on SIGTERM / Ctrl-C."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, free_port, port_open, require_tool, run_tool, wait_for


def start_node(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "pacs-node"), "serve", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_readme_run_command_serves_echo_and_stops_cleanly(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # The README runs `pacs-node serve` in the checkout, i.e. with ./config.toml on port 11112.
    shutil.copy(ROOT / "config.toml", tmp_path / "config.toml")
    if port_open(11112):
        pytest.fail("port 11112 is already in use on this machine")
    proc = start_node(tmp_path)
    try:
        wait_for(lambda: port_open(11112) or proc.poll() is not None, 60, "node to listen")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        echo = run_tool(
            require_tool("echoscu"),
            "-aet",
            "STORESCU",
            "-aec",
            "LDCT_DENOISE",
            "127.0.0.1",
            "11112",
        )
        assert echo.returncode == 0, echo.stderr
        sent = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=5)
        assert time.monotonic() - sent < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "shutting down" in out


def test_echo_from_unknown_caller_is_rejected(write_config, tmp_path: Path) -> None:
    port = free_port()
    path = write_config(
        f'[node]\nbind = "127.0.0.1"\nport = {port}\n[storage]\ndata_dir = "d"\n'
        '[queue]\ndatabase_url = "sqlite:///d/q.sqlite"\n'
    )
    proc = start_node(tmp_path, "--config", str(path))
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 60, "node to listen")
        bad = run_tool(
            require_tool("echoscu"),
            "-aet",
            "INTRUDER",
            "-aec",
            "LDCT_DENOISE",
            "127.0.0.1",
            str(port),
        )
        assert bad.returncode != 0
        wrong_called = run_tool(
            require_tool("echoscu"), "-aet", "STORESCU", "-aec", "OTHER", "127.0.0.1", str(port)
        )
        assert wrong_called.returncode != 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "association rejected: calling AE 'INTRUDER'" in out
    assert "called AE 'OTHER'" in out


def test_port_in_use_is_one_clear_line(write_config, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        path = write_config(f'[node]\nbind = "127.0.0.1"\nport = {port}\n')
        proc = start_node(tmp_path, "--config", str(path))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "cannot start" in out and "Traceback" not in out


def test_json_logs_are_one_object_per_line(node_factory, tmp_path: Path) -> None:
    import json

    from tests.conftest import make_series

    node = node_factory('[logging]\nformat = "json"\n').start()
    assert node.storescu(*map(str, make_series(tmp_path / "s", n=2))).returncode == 0
    node.stop()
    lines = [json.loads(line) for line in node.log().splitlines() if line.strip()]
    assert any("association from STORESCU" in rec["message"] for rec in lines)
    assert all({"time", "level", "logger", "message"} <= set(rec) for rec in lines)
