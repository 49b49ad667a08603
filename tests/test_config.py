from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pacs_node import config
from tests.conftest import BIN, ROOT


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pacs-node"), "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_shipped_config_is_valid_and_matches_embedded_defaults() -> None:
    shipped = config.load(ROOT / "config.toml")
    embedded = config.Config()
    for section in ("node", "model", "destination", "output", "worker", "quality", "http"):
        assert getattr(shipped, section) == getattr(embedded, section), section
    assert shipped.logging == embedded.logging
    # the two paths differ only by being resolved against the file's folder
    same_url = {"database_url": embedded.queue.database_url}
    assert shipped.queue.model_copy(update=same_url) == embedded.queue
    same_dir = {"data_dir": embedded.storage.data_dir}
    assert shipped.storage.model_copy(update=same_dir) == embedded.storage
    assert shipped.node.port == 11112
    assert shipped.node.ae_title == "LDCT_DENOISE"
    assert shipped.storage.data_dir == ROOT / "var"
    assert shipped.queue.database_url == f"sqlite:///{ROOT}/var/jobs.sqlite"


def test_check_config_prints_effective_config() -> None:
    out = check_config(ROOT / "config.toml")
    assert out.returncode == 0, out.stderr
    assert '"ae_title": "LDCT_DENOISE"' in out.stdout


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[node]\nae_tilte = "X"\n', "node.ae_tilte", "unknown key"),
        ("[node]\nport = 70000\n", "node.port", "less than or equal to 65535"),
        ('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "node.ae_title", "1 to 16 characters"),
        ('[destination]\nae_title = ""\n', "destination.ae_title", "1 to 16 characters"),
        ('[model]\ndevice = "gpu"\n', "model.device", "not one of auto, cpu, cuda"),
        ("[nodes]\nport = 1\n", "nodes", "unknown key"),
        ("[node\n", "", "not valid TOML"),
    ],
)
def test_bad_config_gives_one_line_naming_key(
    write_config, text: str, key: str, problem: str
) -> None:
    path = write_config(text)
    out = check_config(path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(path) in lines[0]
    assert f": {key}: " in lines[0] or not key
    assert problem in lines[0]
    assert "Traceback" not in out.stderr


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    out = check_config(tmp_path / "nope.toml")
    assert out.returncode != 0
    assert "no such file" in out.stderr


def test_relative_paths_resolve_against_config_folder(write_config, tmp_path: Path) -> None:
    path = write_config(
        '[storage]\ndata_dir = "data"\n[queue]\ndatabase_url = "sqlite:///db/q.sqlite"\n'
        '[model]\ncheckpoint = "w/g.safetensors"\n'
    )
    cfg = config.load(path)
    assert cfg.storage.data_dir == tmp_path / "data"
    assert cfg.queue.database_url == f"sqlite:///{tmp_path}/db/q.sqlite"
    assert cfg.model.checkpoint == tmp_path / "w/g.safetensors"


def test_env_var_names_default_config(write_config, tmp_path: Path) -> None:
    path = write_config("[node]\nport = 4000\n")
    out = subprocess.run(
        [str(BIN / "pacs-node"), "check-config"],
        capture_output=True,
        text=True,
        env={"PACS_NODE_CONFIG": str(path), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"port": 4000' in out.stdout


def test_wildcard_caller_and_ae_title_rules() -> None:
    assert config.NodeConfig(allowed_calling_ae_titles=["*"]).accepts_any_caller
    with pytest.raises(Exception, match="backslash"):
        config.NodeConfig(ae_title="A\\B")
    with pytest.raises(Exception, match="empty"):
        config.NodeConfig(allowed_calling_ae_titles=[])
