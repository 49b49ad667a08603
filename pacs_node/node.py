"""The running node: storage, job table and Storage SCP, started and stopped together."""

from __future__ import annotations

import logging
import os
import threading

import pydicom

from pacs_node.config import Config
from pacs_node.errors import PermanentError
from pacs_node.http import HttpServer
from pacs_node.jobs import JobStore
from pacs_node.metrics import Metrics
from pacs_node.receive.intake import Intake
from pacs_node.receive.rules import TRANSFER_SYNTAXES
from pacs_node.receive.scp import StorageSCP
from pacs_node.storage import Storage, valid_uid
from pacs_node.work.loop import Worker
from pacs_node.work.series import load_denoiser
from unit_model.checkpoint import CheckpointError

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


class Node:
    """``receive``: run the Storage SCP; ``workers``: how many denoising workers to run."""

    def __init__(self, config: Config, receive: bool = True, workers: int | None = None) -> None:
        self.config = config
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
            StorageSCP(config.node, self.intake.handlers(), TRANSFER_SYNTAXES, self.intake)
            if receive
            else None
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
        if self.n_workers:
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
        self.jobs.migrate()
        if self.config.http.enabled:
            h = self.config.http
            self.http = HttpServer(
                h.bind,
                h.port,
                self.jobs,
                self.storage,
                self.metrics,
                model_loaded=None if not self.n_workers else denoiser is not None,
                token=os.environ.get(h.token_env) if h.token_env else None,
            )
            self.http.start()
        if self.scp is not None:
            recover(self.storage, self.jobs)
            self.scp.start()
        for n in range(self.n_workers):
            assert denoiser is not None
            w = Worker(self.config, self.jobs, self.storage, denoiser, metrics=self.metrics)
            w.name = f"{w.name}/{n}"
            t = threading.Thread(target=w.run, args=(self._stop,), name=f"worker-{n}", daemon=True)
            t.start()
            self.workers.append(w)
            self._threads.append(t)

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
        if self.http is not None:
            self.http.stop()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.jobs.dispose()
