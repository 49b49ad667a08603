"""The HTML status page: each destination's totals, then the newest jobs (what, from whom, when,
where it went, the quality figures and a before/after thumbnail). Refreshes itself; fits a
1280-pixel-wide window (long UIDs shrink to tooltips)."""

from __future__ import annotations

import html
import time

from pacs_node.jobs import JobRow, JobStore

STYLE = """
body{font-family:sans-serif;margin:12px;max-width:1256px}
table{border-collapse:collapse;width:100%;table-layout:fixed;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 5px;vertical-align:middle;overflow-wrap:anywhere}
th{background:#f2f2f2;text-align:left}.done,.delivered{color:#070}.failed{color:#b00}
.pending,.running,.forwarding{color:#a60}img{display:block;width:100%;height:auto}
small{color:#555}
"""
COLUMNS = (  # (heading, width in px): 1232 in all
    ("job", 44),
    ("series", 170),
    ("from", 86),
    ("received", 80),
    ("rule", 110),
    ("state", 84),
    ("slices", 70),
    ("destinations", 170),
    ("quality", 110),
    ("before | after", 196),
    ("last error", 112),
)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _when(t: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t))


def _destinations(j: JobRow) -> str:
    parts = []
    for name, d in j.destinations.items():
        state = d.get("state", "")
        counts = (
            f" {d.get('delivered', 0)}/{d.get('delivered', 0) + d.get('pending', 0)}"
            if "delivered" in d
            else ""
        )
        parts.append(
            f"<span class='{_e(state)}' title='{_e(d.get('last_error') or state)}'>"
            f"{_e(name)}{counts}</span>"
        )
    return "<br>".join(parts)


def _row(j: JobRow) -> str:
    q = j.quality or {}
    figures = (
        f"bias {q['hu_bias']:+.1f} HU<br>noise {q['noise_in']:.1f} → {q['noise_out']:.1f}"
        if q.get("regions")
        else ""
    )
    thumb = (
        f'<img src="/thumbs/{j.id}.png" alt="middle slice, before and after">'
        if j.action == "denoise"
        else "<small>passed on unchanged</small>"
    )
    series = (
        f"<span title='{_e(j.series_uid)}'>{_e(j.series_description) or '<i>no description</i>'}"
        f"</span><br><small>…{_e(j.series_uid[-18:])}</small>"
    )
    state = j.state + (" (flagged)" if j.flagged else "")
    slices = (
        f"{j.received} in<br>{j.denoised} denoised" if j.action == "denoise" else f"{j.received}"
    )
    return (
        f"<tr><td>{j.id}</td><td>{series}</td><td>{_e(j.calling_ae)}</td>"
        f"<td>{_when(j.created_at)}</td><td>{_e(j.rule)}<br><small>{_e(j.action)}</small></td>"
        f"<td class='{_e(j.state)}'>{_e(state)}<br><small>{_e(j.model_version)}</small></td>"
        f"<td>{slices}</td><td>{_destinations(j)}</td><td>{figures}</td><td>{thumb}</td>"
        f"<td><small>{_e(j.last_error)}</small></td></tr>"
    )


def render(jobs: JobStore) -> str:
    totals = (
        "".join(
            f"<tr><td>{_e(name)}</td><td class='delivered'>{t['delivered']}</td>"
            f"<td class='pending'>{t['pending']}</td><td class='failed'>{t['failed']}</td>"
            f"<td><small>{_e(t['last_error'])}</small></td></tr>"
            for name, t in sorted(jobs.destination_report().items())
        )
        or "<tr><td colspan=5>nothing forwarded yet</td></tr>"
    )
    rows = "\n".join(_row(j) for j in jobs.list_jobs(limit=100))
    rows = rows or f"<tr><td colspan={len(COLUMNS)}>no jobs yet</td></tr>"
    cols = "".join(f"<col style='width:{w}px'>" for _, w in COLUMNS)
    heads = "".join(f"<th>{h}</th>" for h, _ in COLUMNS)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>pacs-node status</title>
<meta http-equiv="refresh" content="10"><meta name="viewport" content="width=1280">
<style>{STYLE}</style></head><body><h1>pacs-node</h1>
<h2>Destinations</h2><table><colgroup><col style="width:170px"><col style="width:90px">
<col style="width:90px"><col style="width:90px"><col></colgroup>
<tr><th>destination</th><th>delivered</th><th>pending</th><th>failed</th><th>last error</th></tr>
{totals}</table>
<h2>Jobs</h2><table><colgroup>{cols}</colgroup><tr>{heads}</tr>
{rows}</table></body></html>"""
