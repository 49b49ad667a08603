"""The node's HTTP endpoint (loopback by default): /metrics, /healthz, and a read-only status page.

* ``/metrics``: Prometheus text format (associations, instances received and rejected by reason,
  queue depth by state, denoise seconds and slices, forward failures, GPU memory on CUDA).
* ``/healthz``: JSON; 200 when the job table answers, the disk is above the watermark and the
  model is loaded (when this node denoises); 503 otherwise.
* ``/``: the newest jobs with their state, quality figures and a before/after thumbnail.
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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


def _status_page(jobs: JobStore) -> str:
    rows = []
    for j in jobs.list_jobs(limit=100):
        q = j.quality or {}
        figures = (
            f"bias {q['hu_bias']:+.1f} HU<br>noise {q['noise_in']:.1f} → {q['noise_out']:.1f} HU"
            if q.get("regions")
            else ""
        )
        thumb = f'<img src="/thumbs/{j.id}.png" alt="middle slice, before and after" height="96">'
        rows.append(
            f"<tr><td>{j.id}</td><td><code>{html.escape(j.series_uid)}</code></td>"
            f"<td class='{html.escape(j.state)}'>{html.escape(j.state)}"
            f"{' (flagged)' if j.flagged else ''}</td>"
            f"<td>{j.received}</td><td>{j.denoised}</td><td>{j.delivered}</td><td>{j.attempts}</td>"
            f"<td>{figures}</td><td>{thumb}</td><td>{html.escape(j.last_error or '')}</td></tr>"
        )
    body = "\n".join(rows) or "<tr><td colspan=10>no jobs yet</td></tr>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>pacs-node status</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}}.done{{color:#070}}
.failed{{color:#b00}}</style></head><body><h1>pacs-node: jobs</h1>
<table><tr><th>job</th><th>series UID</th><th>state</th><th>received</th><th>denoised</th>
<th>forwarded</th><th>attempts</th><th>quality</th><th>before | after</th><th>last error</th></tr>
{body}</table></body></html>"""


class HttpServer:
    def __init__(
        self,
        bind: str,
        port: int,
        jobs: JobStore,
        storage: Storage,
        metrics: Metrics,
        model_loaded: bool | None,
    ) -> None:
        self.jobs, self.storage, self.metrics = jobs, storage, metrics
        self.model_loaded = model_loaded
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

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE)
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
                    self._send(200, _status_page(outer.jobs).encode(), "text/html; charset=utf-8")
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
