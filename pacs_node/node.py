"""The running node: storage, job table and Storage SCP, started and stopped together."""

from __future__ import annotations

import logging

import pydicom

from pacs_node.config import Config
from pacs_node.intake import TRANSFER_SYNTAXES, Intake
from pacs_node.queue import Queue
from pacs_node.scp import StorageSCP
from pacs_node.storage import Storage, valid_uid

logger = logging.getLogger(__name__)


def recover(storage: Storage, queue: Queue) -> int:
    """After a crash: drop partial writes, and record files that were renamed into place but not
    yet recorded (their sender got no Success and will resend; recording them loses nothing)."""
    storage.clean_tmp()
    known = queue.known_paths()
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
        queue.record_instance(sop_uid=sop, series_uid=series, study_uid=study, path=str(path))
        n += 1
    if n:
        logger.info("recovery: recorded %d instances found on disk", n)
    return n


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.storage = Storage(config.storage.data_dir, config.storage.min_free_bytes)
        self.queue = Queue(config.queue.database_url)
        self.intake = Intake(self.storage, self.queue)
        self.scp = StorageSCP(config.node, self.intake.handlers(), TRANSFER_SYNTAXES)

    def start(self) -> None:
        self.queue.migrate()
        recover(self.storage, self.queue)
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop()
        self.queue.dispose()
