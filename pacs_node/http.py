"""The node's HTTP endpoint (loopback by default): /metrics, /healthz, and a read-only status page.

* ``/metrics``: Prometheus text format (associations, instances received and rejected by reason,
  queue depth by state, denoise seconds and slices, forward failures, GPU memory on CUDA).
* ``/healthz``: JSON; 200 when the job table answers, the disk is above the watermark and the
  model is loaded (when this node denoises); 503 otherwise.
* ``/``: each destination's totals and the newest jobs (:mod:`pacs_node.status_page`). It shows
  patient images: with a token (needed off loopback) it and the thumbnails need
  ``Authorization: Bearer <token>``; /metrics and /healthz, which carry no patient data, do not.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pacs_node import status_page
from pacs_node.jobs import JobState, JobStore
from pacs_node.metrics import Metrics
from pacs_node.storage import Storage

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QueueCollector(Collector):
    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def collect(self):
        depth = GaugeMetricFamily("pacs_node_queue_jobs", "Jobs by state", labels=["state"])
        try:
            counts = self.jobs.count_by_state()
        except Exception:
            counts = {}
        for state in JobState:
            depth.add_metric([state.value], counts.get(state.value, 0))
        yield depth
        try:
            import torch

            if torch.cuda.is_available():
                gpu = GaugeMetricFamily(
                    "pacs_node_gpu_memory_bytes", "CUDA memory allocated", labels=["device"]
                )
                for d in range(torch.cuda.device_count()):
                    gpu.add_metric([str(d)], torch.cuda.memory_allocated(d))
                yield gpu
        except ImportError:  # pragma: no cover
            pass


def health(
    jobs: JobStore, storage: Storage, model_loaded: bool | None, metrics: Metrics
) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {}
    try:
        jobs.ping()
        checks["database"] = "ok"
    except Exception as err:
        checks["database"] = f"unreachable: {type(err).__name__}"
    try:
        free = storage.free_bytes()
        checks["disk"] = (
            "ok"
            if storage.has_room()
            else (
                f"below watermark: {free} bytes free < "
                f"storage.min_free_bytes {storage.min_free_bytes}"
            )
        )
        checks["disk_free_bytes"] = free
    except OSError as err:
        checks["disk"] = f"unreadable: {err.strerror}"
    checks["model"] = (
        "not used (receive only)"
        if model_loaded is None
        else ("loaded" if model_loaded else "not loaded")
    )
    last = metrics.last_delivery_at
    checks["last_delivery"] = (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last else None
    )
    ok = checks["database"] == "ok" and checks["disk"] == "ok" and model_loaded is not False
    return ok, checks


class HttpServer:
    def __init__(
        self,
        bind: str,
        port: int,
        jobs: JobStore,
        storage: Storage,
        metrics: Metrics,
        model_loaded: bool | None,
        token: str | None = None,
        others: Path | None = None,
    ) -> None:
        self.jobs, self.storage, self.metrics = jobs, storage, metrics
        self.exposed = metrics.exposed(others)  # with the other receiving processes' counters
        self.model_loaded = model_loaded
        self.token = token  # when set, every page but /metrics and /healthz needs it
        metrics.registry.register(_QueueCollector(jobs))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("http: " + fmt, *args)

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self) -> bool:
                if outer.token is None:
                    return True
                given = self.headers.get("Authorization", "")
                return hmac.compare_digest(given.encode(), f"Bearer {outer.token}".encode())

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path not in ("/metrics", "/healthz") and not self._authorised():
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="pacs-node"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path == "/metrics":
                    self._send(200, generate_latest(outer.exposed), CONTENT_TYPE)
                elif path == "/healthz":
                    ok, checks = health(
                        outer.jobs, outer.storage, outer.model_loaded, outer.metrics
                    )
                    self._send(
                        200 if ok else 503,
                        json.dumps({"ok": ok, **checks}).encode(),
                        "application/json",
                    )
                elif path in ("/", "/index.html"):
                    page = status_page.render(outer.jobs).encode()
                    self._send(200, page, "text/html; charset=utf-8")
                elif m := re.fullmatch(r"/thumbs/(\d+)\.png", path):
                    thumb = outer.storage.thumb_path(int(m.group(1)))
                    if thumb.is_file():
                        self._send(200, thumb.read_bytes(), "image/png")
                    else:
                        self._send(404, b"no thumbnail yet", "text/plain")
                else:
                    self._send(404, b"not found", "text/plain")

        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.thread.start()
        logger.info(
            "HTTP status on http://%s:%d/ (metrics, healthz)", *self.server.server_address[:2]
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
