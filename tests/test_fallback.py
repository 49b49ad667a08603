"""The intake and forwarding tests again with the pynetdicom patches off, so pynetdicom's own
receive and send paths (the fallback where its internals differ) are exercised, not assumed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pacs_node import pynetdicom_compat as compat
from tests.conftest import ROOT


@pytest.mark.slow
def test_intake_and_forwarding_pass_on_pynetdicoms_own_paths() -> None:
    env = {**os.environ, compat.ENV_SWITCH: "off"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_intake.py",
            "tests/test_worker.py",
            "-k",
            "not patches_install",  # that one checks the patched path itself
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and " failed" not in res.stdout, tail


def test_the_switch_keeps_the_patches_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compat.ENV_SWITCH, "off")
    was = compat.installed()
    compat.uninstall()
    try:
        assert compat.install() is False and not compat.installed()
    finally:
        monkeypatch.delenv(compat.ENV_SWITCH)
        if was:
            assert compat.install()
