"""The running node: storage, job table and Storage SCP, started and stopped together."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from pacs_node.config import Config
from pacs_node.errors import PermanentError
from pacs_node.http import HttpServer
from pacs_node.jobs import JobStore
from pacs_node.metrics import Metrics, Publisher
from pacs_node.receive.intake import Intake
from pacs_node.receive.rules import TRANSFER_SYNTAXES
from pacs_node.receive.scp import StorageSCP
from pacs_node.storage import Storage, valid_uid

if TYPE_CHECKING:
    from pacs_node.work.loop import Worker

logger = logging.getLogger(__name__)


def recover(storage: Storage, jobs: JobStore) -> int:
    """After a crash: drop partial writes, and record files that were renamed into place but not
    yet recorded (their sender got no Success and will resend; recording them loses nothing)."""
    storage.clean_tmp()
    known = jobs.known_paths()
    n = 0
    for path in storage.received_dir.glob("*/*.dcm"):
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study, series, sop = (
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
            )
        except Exception as err:
            logger.warning("recovery: unreadable file %s left alone: %s", path, err)
            continue
        if (
            not all(map(valid_uid, (study, series, sop)))
            or storage.received_path(series, sop) != path
        ):
            logger.warning("recovery: %s does not match its UIDs, left alone", path)
            continue
        jobs.record_instance(sop_uid=sop, series_uid=series, study_uid=study, path=str(path))
        n += 1
    if n:
        logger.info("recovery: recorded %d instances found on disk", n)
    return n


class Receivers:
    """The node.receive_processes - 1 other processes receiving on the node's port (``pacs-node
    receive``), restarted when one ends that was not asked to."""

    def __init__(self, config: Config) -> None:
        if config.source is None:
            raise PermanentError("node.receive_processes > 1 needs a configuration file")
        self.command = [
            str(Path(sys.executable).parent / "pacs-node"),
            "receive",
            "--config",
            str(config.source),
        ]
        self.count = config.node.receive_processes - 1
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._supervise, name="receivers", daemon=True)

    def start(self) -> None:
        self.procs = [subprocess.Popen(self.command) for _ in range(self.count)]
        self._watch.start()
        logger.info("%d more processes receive on the port", self.count)

    def _supervise(self) -> None:
        delay = 1.0  # doubled while they keep ending, up to a minute
        while not self._stop.wait(delay):
            ended = [k for k, p in enumerate(self.procs) if p.poll() is not None]
            delay = min(60.0, delay * 2) if ended else 1.0
            for k in ended:
                if self._stop.is_set():
                    return
                logger.warning(
                    "receiving process %d ended (exit %s); starting another",
                    self.procs[k].pid,
                    self.procs[k].returncode,
                )
                self.procs[k] = subprocess.Popen(self.command)

    def stop(self) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Node:
    """``receive``: run the Storage SCP; ``workers``: how many denoising workers to run;
    ``receiver``: one of several receiving processes (Storage SCP only, started by another
    node)."""

    def __init__(
        self,
        config: Config,
        receive: bool = True,
        workers: int | None = None,
        receiver: bool = False,
    ) -> None:
        self.config = config
        self.receiver = receiver
        shared = config.node.receive_processes > 1
        self.storage = Storage(config.storage.data_dir, config.storage.min_free_bytes)
        self.jobs = JobStore(config.queue.database_url)
        self.metrics = Metrics()
        self.intake = Intake(
            self.storage,
            self.jobs,
            self.metrics,
            config.rules,
            tuple(d.name for d in config.destination),
        )
        self.scp = (
            StorageSCP(
                config.node,
                self.intake.handlers(),
                TRANSFER_SYNTAXES,
                self.intake,
                slots=self.storage.root / "run" if shared else None,
            )
            if receive
            else None
        )
        self.receivers = Receivers(config) if receive and shared and not receiver else None
        # the other receiving processes' counters, summed into this one's /metrics
        self.published = self.storage.root / "run" / "metrics" if shared else None
        self.publisher = (
            Publisher(self.metrics, self.published) if receiver and self.published else None
        )
        self.n_workers = config.worker.count if workers is None else workers
        self.workers: list[Worker] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.http: HttpServer | None = None

    def check(self) -> None:
        """What the configuration needs from the environment: raise PermanentError naming the
        key when it is missing."""
        for d in self.config.destination:
            if d.auth_env and not os.environ.get(d.auth_env):
                raise PermanentError(
                    f"destination {d.name!r}: auth_env names {d.auth_env}, which is not set"
                )
        h = self.config.http
        if h.enabled and not h.on_loopback:
            if not h.token_env:
                raise PermanentError(
                    f"http.bind = {h.bind!r} is not a loopback address and the status page shows "
                    "patient images: set http.token_env to the environment variable holding "
                    "its bearer token"
                )
            if not os.environ.get(h.token_env):
                raise PermanentError(f"http.token_env names {h.token_env}, which is not set")

    def start(self) -> None:
        """Check the environment and load the model first: a node that cannot denoise refuses
        to start, before it accepts data it could never process."""
        self.check()
        denoiser = None
        if self.n_workers:  # torch and the model only where they are used
            from pacs_node.work.series import load_denoiser
            from unit_model.checkpoint import CheckpointError

            try:
                denoiser = load_denoiser(self.config)
            except CheckpointError as err:
                raise PermanentError(f"no usable model checkpoint: {err}") from None
            logger.info(
                "model %s loaded on %s (%s)",
                denoiser.model_version,
                denoiser.device,
                str(denoiser.dtype).removeprefix("torch."),
            )
        if not self.receiver:
            self.jobs.migrate()
        if self.config.http.enabled and not self.receiver:
            h = self.config.http
            self.http = HttpServer(
                h.bind,
                h.port,
                self.jobs,
                self.storage,
                self.metrics,
                model_loaded=None if not self.n_workers else denoiser is not None,
                token=os.environ.get(h.token_env) if h.token_env else None,
                others=self.published,
            )
            self.http.start()
        if self.scp is not None:
            if not self.receiver:
                recover(self.storage, self.jobs)
            self.scp.start()
        if self.receivers is not None:
            assert self.published is not None
            for stale in self.published.glob("*.json"):  # counts of the node's last run
                stale.unlink()
            self.receivers.start()
        if self.publisher is not None:
            self.publisher.start()
        for n in range(self.n_workers):
            from pacs_node.work.loop import Worker

            assert denoiser is not None
            w = Worker(
                self.config,
                self.jobs,
                self.storage,
                denoiser,
                metrics=self.metrics,
                wake=self.intake.arrived,
            )
            w.name = f"{w.name}/{n}"
            t = threading.Thread(target=w.run, args=(self._stop,), name=f"worker-{n}", daemon=True)
            t.start()
            self.workers.append(w)
            self._threads.append(t)

    def stop(self) -> None:
        if self.receivers is not None:
            self.receivers.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.publisher is not None:
            self.publisher.stop()
        if self.http is not None:
            self.http.stop()
        self._stop.set()
        self.intake.arrived.set()  # the workers' idle wait
        for t in self._threads:
            t.join(timeout=30)
        self.jobs.dispose()
