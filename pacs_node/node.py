"""The running node: the Storage SCP and what it feeds, started and stopped together."""

from __future__ import annotations

import logging

from pacs_node.config import Config
from pacs_node.scp import StorageSCP

logger = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.scp = StorageSCP(config.node)

    def start(self) -> None:
        self.scp.start()

    def stop(self) -> None:
        self.scp.stop()
