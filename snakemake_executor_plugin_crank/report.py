"""The usage report of a run: one self-contained HTML file made from the trace's rows.

Per rule, the spread of peak memory against the ``mem_mb`` asked, of CPU efficiency
(cpu_s / (realtime_s x threads)) and of wall time against ``runtime``; a timeline of the
jobs (queued, running); the right-sizing hints with their profile snippet; a table.

The plots are drawn by plotly.js in the browser, from data embedded in the page: plotly's
Python package carries the library (about 4.8 MB), which is embedded whole, so the page
needs no network when it is viewed. Making the page costs the run about 50 ms and draws
nothing in Python (matplotlib would take seconds per run and numpy with it).
"""

from __future__ import annotations

import datetime
import html
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from . import sizing

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; }
.plot { width: 100%; min-height: 380px; }
.none { color: #777; }
"""

# draws every figure in the page's data; a figure without data is left out by report.html
DRAW = """
const figures = JSON.parse(document.getElementById("crank-data").textContent);
for (const [id, figure] of Object.entries(figures)) {
  Plotly.newPlot(id, figure.data, figure.layout, {responsive: true, displaylogo: false});
}
"""

COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2",
          "#FF9DA6", "#9D755D", "#BAB0AC")


def html_page(rows: Sequence[Mapping[str, Any]], hints: Sequence[sizing.Hint], run_id: str,
              backend: str) -> str:
    rules = sizing.summarize(rows)
    figures = {name: figure for name, figure in (
        ("memory", _memory(rows, rules)), ("cpu", _cpu(rows)), ("walltime", _walltime(rows, rules)),
        ("timeline", _timeline(rows)),
    ) if figure}
    failed = sum(1 for row in rows if row["status"] != "ok")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>crank: what each job used, run {html.escape(run_id)}</title>",
        f"<style>{STYLE}</style>",
        f"<script>{_plotly_js()}</script>",
        "</head><body>",
        "<h1>What each job used</h1>",
        f"<p>Run {html.escape(run_id)} on the {html.escape(backend)} backend: {len(rows)} job attempt(s), "
        f"{failed} failed. The figures come from {html.escape(run_id)}.tsv beside this page.</p>",
        "<h2>Right-sized resources</h2>",
    ]
    if hints:
        parts.append("<ul>" + "".join(f"<li>{html.escape(h.line.removeprefix('crank: '))}</li>"
                                      for h in hints) + "</ul>")
        parts.append(f"<pre>{html.escape(sizing.profile_snippet(hints))}</pre>")
    else:
        parts.append('<p class="none">Every rule used what it asked for, or was not measured.</p>')
    parts.append("<h2>Per rule</h2>")
    parts.append(_table(rules))
    titles = {"memory": "Peak memory", "cpu": "CPU efficiency", "walltime": "Wall time",
              "timeline": "Timeline"}
    for name, title in titles.items():
        parts.append(f"<h2>{title}</h2>")
        if name in figures:
            parts.append(f'<div class="plot" id="{name}"></div>')
        else:
            parts.append('<p class="none">Not measured on this backend for these jobs.</p>')
    parts.append(f'<script type="application/json" id="crank-data">{_json(figures)}</script>')
    parts.append(f"<script>{DRAW}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:  # the page still has its table and hints
        return "window.Plotly = {newPlot: function () {}};"
    return get_plotlyjs()


def _json(value: Any) -> str:
    # inside a <script> element: "</" would end it
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def _by_rule(rows: Sequence[Mapping[str, Any]]) -> Dict[str, List[Mapping[str, Any]]]:
    grouped: Dict[str, List[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["rule"], []).append(row)
    return grouped


def _label(row: Mapping[str, Any]) -> str:
    return f"{row['rule']} job {row['jobid']} attempt {row['attempt']}"


def _spread(rows, rules, value, asked, asked_name: str, unit: str, title: str) -> Optional[dict]:
    """Per rule, a box of ``value`` over its jobs and a mark at what it asked."""
    data = []
    for n, (rule, of_rule) in enumerate(_by_rule(rows).items()):
        points = [(value(r), _label(r)) for r in of_rule if value(r) is not None]
        if not points:
            continue
        data.append({"type": "box", "name": rule, "y": [p[0] for p in points],
                     "text": [p[1] for p in points], "boxpoints": "all", "jitter": 0.4,
                     "pointpos": 0, "marker": {"color": COLORS[n % len(COLORS)]},
                     "hovertemplate": f"%{{text}}: %{{y:.1f}} {unit}<extra></extra>", "showlegend": False})
    if not data:
        return None
    marks = [(rule, asked(summary)) for rule, summary in rules.items() if asked(summary)]
    if marks:
        data.append({"type": "scatter", "mode": "markers", "name": asked_name,
                     "x": [m[0] for m in marks], "y": [m[1] for m in marks],
                     "marker": {"symbol": "line-ew-open", "size": 40, "line": {"width": 3}, "color": "#222"},
                     "hovertemplate": f"%{{x}}: {asked_name} %{{y:.0f}} {unit}<extra></extra>"})
    return {"data": data, "layout": {"yaxis": {"title": {"text": title}, "rangemode": "tozero"},
                                     "margin": {"t": 20}, "legend": {"orientation": "h"}}}


def _memory(rows, rules) -> Optional[dict]:
    return _spread(rows, rules, lambda r: r["peak_rss_mb"], lambda s: s.mem_mb, "mem_mb asked", "MB",
                   "peak memory (MB)")


def _walltime(rows, rules) -> Optional[dict]:
    longest = max((r["realtime_s"] or 0 for r in rows), default=0)
    if longest < 120:  # short jobs: in seconds
        return _spread(rows, rules, lambda r: r["realtime_s"],
                       lambda s: None if s.runtime_min is None else s.runtime_min * 60,
                       "runtime asked", "s", "wall time (s)")
    return _spread(rows, rules, lambda r: _minutes(r["realtime_s"]), lambda s: s.runtime_min,
                   "runtime asked", "min", "wall time (min)")


def _cpu(rows) -> Optional[dict]:
    def efficiency(r):
        if r["cpu_s"] is None or not r["realtime_s"] or not r["cpus"]:
            return None
        return 100 * r["cpu_s"] / (r["realtime_s"] * r["cpus"])

    figure = _spread(rows, {}, efficiency, lambda s: None, "", "%",
                     "CPU efficiency (% of the threads asked)")
    if figure:
        for trace in figure["data"]:
            cpus = max((r["cpus"] or 0) for r in rows if r["rule"] == trace["name"])
            trace["name"] = f"{trace['name']} (threads={cpus})"
        figure["layout"]["shapes"] = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 100,
                                       "y1": 100, "line": {"dash": "dot", "color": "#999"}}]
    return figure


def _timeline(rows) -> Optional[dict]:
    """A bar per job attempt: queued (from crank's submission, or the backend's queue time)
    then running (its running time, ending when crank learned of its end)."""
    queued: Dict[str, list] = {"y": [], "base": [], "x": [], "text": []}
    running: Dict[str, Dict[str, list]] = {}
    for row in rows:
        ended, seconds = _time(row["ended"]), row["realtime_s"]
        if ended is None or seconds is None:
            continue
        start = ended - datetime.timedelta(seconds=seconds)
        label = _label(row)
        since = _time(row["submitted"])
        if row["queue_s"] is not None:
            since = start - datetime.timedelta(seconds=row["queue_s"])
        if since is not None and since < start:
            for key, value in (("y", label), ("base", since.isoformat()),
                               ("x", (start - since).total_seconds() * 1000), ("text", label)):
                queued[key].append(value)
        bars = running.setdefault(row["rule"], {"y": [], "base": [], "x": [], "text": []})
        for key, value in (("y", label), ("base", start.isoformat()), ("x", seconds * 1000),
                           ("text", f"{label}: {row['status']}")):
            bars[key].append(value)
    if not running:
        return None
    data = [{"type": "bar", "orientation": "h", "name": "queued", "marker": {"color": "#ccc"},
             "textposition": "none", "hovertemplate": "%{text}: queued<extra></extra>", **queued}]
    for n, (rule, bars) in enumerate(running.items()):
        data.append({"type": "bar", "orientation": "h", "name": rule, "marker": {"color": COLORS[n % len(COLORS)]},
                     "textposition": "none", "hovertemplate": "%{text}<extra></extra>", **bars})
    count = len({label for bars in running.values() for label in bars["y"]})
    return {"data": data, "layout": {
        "barmode": "overlay", "xaxis": {"type": "date", "title": {"text": "time (UTC)"}},
        "yaxis": {"autorange": "reversed", "showticklabels": count <= 60, "automargin": True},
        "height": min(2000, 160 + 18 * count), "margin": {"t": 20}, "legend": {"orientation": "h"}}}


def _table(rules: Mapping[str, sizing.RuleUsage]) -> str:
    head = ("rule", "attempts", "failed", "mem_mb asked", "peak MB (jobs ok)", "threads asked", "threads busy",
            "runtime asked (min)", "longest (min)")
    rows = []
    for r in rules.values():
        cells = (r.rule, r.jobs, r.failed, _num(r.mem_mb), _num(r.peak_mb), _num(r.cpus), _num(r.cores_used, 1),
                 _num(r.runtime_min), _num(_minutes(r.realtime_s), 1))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _num(value: Optional[float], digits: int = 0) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _minutes(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds / 60


def _time(text: Optional[str]) -> Optional[datetime.datetime]:
    return None if not text else datetime.datetime.fromisoformat(text)
