from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ports import free_port as free_port  # re-exported for the test helpers
from tests.ports import port_open as port_open

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def wait_for(
    predicate: Callable[[], object], timeout: float = 30, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def require_tool(name: str) -> str:
    """The system's ``name`` (pynetdicom puts its own storescu/echoscu apps into the venv)."""
    path = shutil.which(name, path="/usr/bin:/usr/sbin:/usr/local/bin")
    if path is None:
        pytest.fail(f"{name} is not installed: run ./install.sh --test")
    return path


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_tool(
    *args: str, check: bool = False, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=dcmtk_env(), timeout=timeout, check=check
    )


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# -- DICOM data and a node process ------------------------------------------------------------

PATIENT_NAME = "SECRETSURNAME^GIVENNAME"
PATIENT_ID = "PID-7731-SECRET"


def make_series(
    folder: Path,
    n: int = 10,
    size: int = 64,
    seed: int = 0,
    noise_sd: float = 0.0,
    patient_id: str = PATIENT_ID,
) -> list[Path]:
    """A CT series of ``n`` slices (procedural body, optional white noise), one file a slice."""
    from train.synth import simple_series

    return simple_series(folder, n, size, seed, noise_sd, PATIENT_NAME, patient_id)


class NodeProcess:
    """``pacs-node serve`` (or another verb) as a child process with its own config and port."""

    def __init__(
        self,
        tmp: Path,
        extra: str = "",
        verb: str = "serve",
        port: int | None = None,
        workers: int = 0,
        data_dir: Path | None = None,
    ) -> None:
        self.tmp = tmp
        self.port = port or free_port()
        self.http_port = free_port()
        self.config = tmp / "node.toml"
        self.config.write_text(
            f'[node]\nbind = "127.0.0.1"\nport = {self.port}\n'
            f'allowed_calling_ae_titles = ["STORESCU", "SENDER1", "SENDER2"]\n'
            f"[storage]\nmin_free_bytes = 0\n"
            + (f'data_dir = "{data_dir}"\n' if data_dir else "")
            + f"[worker]\ncount = {workers}\n"
            + ("" if "[http]" in extra else f"[http]\nport = {self.http_port}\n")
            + extra
        )
        self.verb = verb
        self.log_path = tmp / f"node-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> NodeProcess:
        logf = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [str(BIN / "pacs-node"), self.verb, "--config", str(self.config)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
        )
        logf.close()
        if wait:
            wait_for(
                lambda: port_open(self.port) or self.proc.poll() is not None, 90, "node to listen"
            )
            assert self.proc.poll() is None, self.log()
            http_on = f"[http]\nport = {self.http_port}" in self.config.read_text()
            if self.verb == "serve" and http_on:
                wait_for(lambda: port_open(self.http_port), 30, "the HTTP endpoint")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def storescu(
        self,
        *files: str,
        opts: tuple[str, ...] = (),
        aet: str = "STORESCU",
        aec: str = "LDCT_DENOISE",
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        return run_tool(
            require_tool("storescu"),
            "-aet",
            aet,
            "-aec",
            aec,
            *opts,
            "127.0.0.1",
            str(self.port),
            *files,
            timeout=timeout,
        )

    def status(self) -> list[dict[str, object]]:
        import json

        out = subprocess.run(
            [str(BIN / "pacs-node"), "status", "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout)["jobs"])


@pytest.fixture
def node_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    nodes: list[NodeProcess] = []

    def make(extra: str = "", **kw: object) -> NodeProcess:
        sub = tmp_path / f"node{len(nodes)}"
        sub.mkdir()
        node = NodeProcess(sub, extra, **kw)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop()
    # No patient name, ID or birth date in any log line of any node a test ran.
    for n in nodes:
        log = n.log()
        for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, "SYNTH^"):
            assert secret not in log, f"patient data {secret!r} in {n.log_path}"
        assert re.search(r"\bS\d{6}\b", log) is None, f"a synthetic patient ID in {n.log_path}"


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    from tests.pg import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same queue tests against SQLite and a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.sqlite"
    server = request.getfixturevalue("postgres")
    return str(server.create_db(f"t{abs(hash(str(tmp_path))) % 10**9}"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, untrained, identity-initialised generator: fast, for pipeline mechanics."""
    from unit_model import checkpoint as ckpt
    from unit_model.networks import GeneratorConfig, UnitGenerator
    from unit_model.transforms import HUWindow

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ckpt.save(path, UnitGenerator(GeneratorConfig(filters=4, residual_output=True)), HUWindow())
    return path
