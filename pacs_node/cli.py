"""``pacs-node``: the command line of the node (a typer app).

Every verb takes ``--config PATH``, defaulting to ``$PACS_NODE_CONFIG`` then ``./config.toml``;
with neither present, the embedded defaults apply.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from pacs_node import config as config_mod
from pacs_node import log

logger = logging.getLogger(__name__)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A DICOM node that denoises low-dose CT series with a UNIT generator and forwards them.",
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="config.toml to use [default: $PACS_NODE_CONFIG, then ./config.toml, "
        "then the embedded defaults]",
        show_default=False,
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"pacs-node: {message}", err=True)
    return typer.Exit(code)


def load_config(path: Path | None) -> config_mod.Config:
    """The --config file, or $PACS_NODE_CONFIG / ./config.toml, or the embedded defaults."""
    try:
        if path is not None:
            return config_mod.load(path)
        default = config_mod.default_path()
        if default.exists() or config_mod.ENV_VAR in os.environ:
            return config_mod.load(default)
        return config_mod.defaults()
    except config_mod.ConfigError as err:
        raise _fail(str(err)) from None


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate the configuration and print the effective values (paths resolved)."""
    cfg = load_config(config)
    source = str(cfg.source) if cfg.source else "(embedded defaults)"
    typer.echo(f"# {source}: OK")
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


def _run_until_signal(
    cfg: config_mod.Config, receive: bool, workers: int | None, receiver: bool = False
) -> None:
    log.setup(cfg.logging.level, cfg.logging.format)
    from pacs_node.node import Node  # heavy imports only for the verbs that need them

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = Node(cfg, receive=receive, workers=workers, receiver=receiver)
    try:
        node.start()
    except Exception as err:  # a start-up failure is the admin's to fix: one line, no traceback
        logger.debug("start-up failed", exc_info=True)
        node.stop()
        raise _fail(f"cannot start: {err}", 1) from None
    parent = os.getppid()
    try:
        while not stop.wait(0.5):
            if receiver and os.getppid() != parent:  # the node that started it is gone
                logger.warning("the node that started this receiving process is gone; stopping")
                break
    finally:
        node.stop()
    logger.info("stopped")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the Storage SCP and the denoising workers until SIGTERM or Ctrl-C."""
    cfg = load_config(config)
    _run_until_signal(cfg, receive=True, workers=None)


@app.command(hidden=True)
def receive(config: ConfigOption = None) -> None:
    """One more process receiving on the node's port (started by `serve` when
    node.receive_processes > 1): the Storage SCP only."""
    cfg = load_config(config)
    _run_until_signal(cfg, receive=True, workers=0, receiver=True)


@app.command()
def worker(
    config: ConfigOption = None,
    count: Annotated[
        int | None, typer.Option(help="workers to run [default: worker.count]")
    ] = None,
) -> None:
    """Run denoising workers only (no SCP), sharing the job table: for scale-out."""
    cfg = load_config(config)
    _run_until_signal(cfg, receive=False, workers=max(1, count or cfg.worker.count))


@app.command()
def retry(
    job: Annotated[int, typer.Argument(help="job id, from `pacs-node status`")],
    destination: Annotated[
        str | None,
        typer.Option(help="only this destination (default: every one that gave up)"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Requeue a failed job (attempts reset); a retry sends only what was not delivered."""
    cfg = load_config(config)
    from pacs_node.jobs import JobStore

    queue = JobStore(cfg.queue.database_url)
    try:
        queue.migrate()
        problem = queue.retry(job, destination)
        if problem:
            raise _fail(problem, 1)
    finally:
        queue.dispose()
    typer.echo(f"job {job} requeued")


@app.command()
def denoise(
    in_dir: Annotated[Path, typer.Argument(help="folder of CT DICOM files (read recursively)")],
    out_dir: Annotated[Path, typer.Argument(help="where the derived series are written")],
    config: ConfigOption = None,
) -> None:
    """Run the node's decode -> denoise -> derive path on a folder, without the network."""
    cfg = load_config(config)
    log.setup(cfg.logging.level, cfg.logging.format)
    if not in_dir.is_dir():
        raise _fail(f"{in_dir}: not a folder")
    from pacs_node.work.series import denoise_folder, load_denoiser
    from unit_model.checkpoint import CheckpointError

    try:
        den = load_denoiser(cfg)
    except CheckpointError as err:
        raise _fail(f"no usable model checkpoint: {err}", 1) from None
    results = denoise_folder(in_dir, out_dir, cfg, den)
    for series, (n, q) in results.items():
        figures = (
            f"bias {q.hu_bias:+.1f} HU, noise {q.noise_in:.1f} -> {q.noise_out:.1f} HU"
            if q.regions
            else ""
        )
        typer.echo(f"{series}: {n} instances {figures}")
    typer.echo(f"written to {out_dir}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the report")] = Path("demo-report"),
    slices: Annotated[int, typer.Option(help="slices in the synthetic series")] = 8,
    size: Annotated[
        int,
        typer.Option(
            help="matrix size over a 380 mm field of view; 512 gives a quarter-dose abdomen's "
            "noise (smaller matrices have larger pixels, hence less noise)"
        ),
    ] = 512,
    config: ConfigOption = None,
) -> None:
    """Synthetic low-dose series -> node -> local destination, then a report with montages."""
    cfg = load_config(config)
    log.setup("WARNING", cfg.logging.format)
    from pacs_node.demo import run_demo
    from pacs_node.errors import PacsNodeError
    from unit_model.checkpoint import CheckpointError

    try:
        report = run_demo(out, slices=slices, size=size, checkpoint=cfg.model.checkpoint)
    except (CheckpointError, PacsNodeError, RuntimeError, subprocess.CalledProcessError) as err:
        raise _fail(f"demo failed: {err}", 1) from None
    typer.echo(f"report: {report.resolve()}")


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    limit: Annotated[int, typer.Option(help="newest jobs to show")] = 50,
) -> None:
    """Show the jobs: series, instance counts, state, attempts, last error."""
    cfg = load_config(config)
    from pacs_node.jobs import JobStore

    queue = JobStore(cfg.queue.database_url)
    try:
        queue.migrate()
        rows = queue.list_jobs(limit=limit)
        per_destination = queue.destination_report()
    except Exception as err:
        raise _fail(f"cannot read the job table at {cfg.queue.database_url}: {err}", 1) from None
    finally:
        queue.dispose()
    if as_json:
        typer.echo(
            json.dumps(
                {"jobs": [r.to_dict() for r in rows], "destinations": per_destination}, indent=2
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    if per_destination:
        dest = Table("destination", "delivered", "pending", "failed", "last error", box=None)
        for name, t in sorted(per_destination.items()):
            dest.add_row(
                name,
                str(t["delivered"]),
                str(t["pending"]),
                str(t["failed"]),
                (t["last_error"] or "")[:100],
            )
        console.print(dest)
        console.print()
    table = Table(
        "job",
        "series",
        "from",
        "action",
        "received",
        "denoised",
        "destinations",
        "state",
        "attempts",
        "model",
        "last error",
        box=None,
    )
    for r in rows:
        places = ", ".join(
            f"{name} {d.get('delivered', 0)}/{d.get('delivered', 0) + d.get('pending', 0)}"
            + (f" {d['state']}" if d.get("state") not in ("delivered", "pending") else "")
            for name, d in r.destinations.items()
        )
        table.add_row(
            str(r.id),
            f"{r.series_description or ''} {r.series_uid}".strip(),
            r.calling_ae or "",
            r.action,
            str(r.received),
            str(r.denoised) if r.action == "denoise" else "-",
            places,
            r.state + (" (flagged)" if r.flagged else ""),
            str(r.attempts),
            r.model_version or "",
            (r.last_error or "")[:80],
        )
    console.print(table if rows else "no jobs yet")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
