"""/metrics, /healthz and the status page of a running node."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, make_series, wait_for
from tests.peers import RecordingSCP
from tests.pg import PostgresServer
from tests.test_worker import MECHANICS, node_config


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_when_a_series_is_processed(
    tmp_path: Path,
    node_factory,
    tiny_checkpoint: Path,
) -> None:
    dest = RecordingSCP().start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1).start()
        before = samples(node.http_port)
        assert before[("pacs_node_instances_received_total", ())] == 0
        assert (
            node.storescu(*map(str, make_series(tmp_path / "s", n=6, noise_sd=10))).returncode == 0
        )
        node.storescu(str(make_series(tmp_path / "x", n=1)[0]), aet="STORESCU", aec="WRONG")
        wait_for(lambda: node.status()[0]["state"] == "done", 120, "job done")
        after = samples(node.http_port)
        assert after[("pacs_node_instances_received_total", ())] == 6
        assert after[("pacs_node_denoised_slices_total", ())] == 6
        delivered = ("pacs_node_instances_delivered_total", (("destination", "default"),))
        assert after[delivered] == 6
        assert after[("pacs_node_associations_total", (("outcome", "released"),))] >= 1
        assert after[("pacs_node_associations_total", (("outcome", "rejected"),))] == 1
        assert after[("pacs_node_queue_jobs", (("state", "done"),))] == 1
        assert after[("pacs_node_denoise_seconds_count", ())] >= 1
        status, page = get(node.http_port, "/")
        assert status == 200 and b"done" in page and b"/thumbs/" in page
        job = node.status()[0]["id"]
        status, png = get(node.http_port, f"/thumbs/{job}.png")
        assert status == 200 and png.startswith(b"\x89PNG")
        status, health = get(node.http_port, "/healthz")
        assert status == 200 and json.loads(health)["model"] == "loaded"
    finally:
        dest.stop()


def test_healthz_503_when_disk_below_watermark(node_factory) -> None:
    node = node_factory()
    node.config.write_text(
        node.config.read_text().replace(
            "min_free_bytes = 0", "min_free_bytes = 10**18".replace("10**18", str(10**18))
        )
    )
    node.start()
    status, body = get(node.http_port, "/healthz")
    assert status == 503
    assert "below watermark" in json.loads(body)["disk"]


def test_healthz_503_when_database_unreachable(node_factory) -> None:
    server = PostgresServer().start()
    try:
        url = server.create_db("health")
        node = node_factory(f'[queue]\ndatabase_url = "{url}"\n').start()
        assert get(node.http_port, "/healthz")[0] == 200
        server.stop()
        status, body = get(node.http_port, "/healthz")
        assert status == 503
        assert json.loads(body)["database"].startswith("unreachable")
    finally:
        server.stop()


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,800",
]


def test_status_page_renders_in_chromium_with_jobs_and_thumbnails(
    tmp_path: Path,
    node_factory,
    tiny_checkpoint: Path,
) -> None:
    import subprocess

    import numpy as np
    from PIL import Image

    from tests.conftest import require_tool

    chromium = require_tool("chromium")
    dest = RecordingSCP().start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1).start()
        assert (
            node.storescu(
                *map(str, make_series(tmp_path / "s", n=6, size=128, noise_sd=10))
            ).returncode
            == 0
        )
        wait_for(lambda: node.status()[0]["state"] == "done", 120, "job done")
        url = f"http://127.0.0.1:{node.http_port}/"
        profile = tmp_path / "profile"
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert dom.returncode == 0, dom.stderr[-2000:]
        job = node.status()[0]
        page = dom.stdout
        assert f"<td>{job['id']}</td>" in page and f'title="{job["series_uid"]}"' in page
        assert "done" in page and f"/thumbs/{job['id']}.png" in page
        # what an admin looks for: description, sender, model, and the destination's count
        for shown in ("Low Dose Images", "STORESCU", job["model_version"], "default 6/6"):
            assert shown in page, shown
        assert '<meta http-equiv="refresh"' in page
        shot = tmp_path / "status.png"
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
            capture_output=True,
            timeout=120,
            check=True,
        )
        img = np.asarray(Image.open(shot).convert("L"))
        assert img.shape[1] == 1280
        # The before/after thumbnail (a CT slice) makes mid-grey pixels that text on white does
        # not; in a 1280-pixel window its column lies whole inside the page's right part.
        grey = (img > 40) & (img < 200)
        assert grey[:, 930:1140].mean() > 0.01 and grey[:, 1140:].mean() < grey[:, 930:1140].mean()
    finally:
        dest.stop()


def test_off_loopback_the_status_page_needs_a_token(
    node_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It shows patient images: with http.bind off loopback the node refuses to start without a
    token, and with one the page and thumbnails need it while /metrics and /healthz do not."""
    port = free_port()
    open_bind = f'[http]\nbind = "0.0.0.0"\nport = {port}\n'
    refused = node_factory(open_bind).start(wait=False)
    assert refused.proc is not None and refused.proc.wait(60) != 0
    assert "http.token_env" in refused.log()
    monkeypatch.setenv("PACS_TEST_HTTP_TOKEN", "s3cret")
    node = node_factory(open_bind + 'token_env = "PACS_TEST_HTTP_TOKEN"\n')
    node.http_port = port
    node.start()
    assert get(port, "/")[0] == 401 and get(port, "/thumbs/1.png")[0] == 401
    assert get(port, "/metrics")[0] == 200 and get(port, "/healthz")[0] == 200
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", headers={"Authorization": "Bearer s3cret"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200 and b"pacs-node" in r.read()
    wrong = urllib.request.Request(
        f"http://127.0.0.1:{port}/", headers={"Authorization": "Bearer guess"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(wrong, timeout=10)
    assert err.value.code == 401
