"""The status page's HTML: one inline stylesheet, one small inline script, no external assets.

Escaping is by construction, not by care: data reaches the page only through ``html()``,
which escapes every value that is not already ``Html`` (markup this module built). A plain
``str`` is therefore always escaped; the worst a mistake can do is escape twice (visible),
never inject. The Content-Security-Policy allows only this module's script and stylesheet,
by hash, so even markup slipped in some other way would not run.

The first render is complete (the page is fully useful with JavaScript off); the script
re-fetches the fragment every REFRESH_SECONDS and swaps it in, counting the swaps in the
``data-refreshed`` attribute of ``#live``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from html import escape
from urllib.parse import quote

from tandem.scheduler.schemas import Instance, PendingTask, TaskRun, TaskState
from tandem.status.service import Snapshot

REFRESH_SECONDS = 2
# Without JavaScript the browser reloads the page itself, less often.
NOSCRIPT_REFRESH_SECONDS = 10
FRAGMENT_PATH = "status/fragment"


class Html(str):
    """Markup safe to send as it is: built by ``html()`` or a constant of this module."""

    __slots__ = ()


def html(template: str, /, **values: object) -> Html:
    """``template`` (a constant with ``{name}`` fields) with every value escaped, quotes too
    (safe in attributes), unless it is ``Html`` already."""
    escaped = {
        name: value if isinstance(value, Html) else escape(str(value), quote=True)
        for name, value in values.items()
    }
    return Html(template.format_map(escaped))


def join(parts: Iterable[Html]) -> Html:
    return Html("".join(parts))


# --- numbers and times ------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """A short human duration: 0.4 s, 12 s, 3 min 5 s, 2 h 10 min, 1 d 4 h."""
    s = abs(seconds)
    if s < 10:
        return f"{s:.1f} s"
    whole = int(s)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    if whole < 86400:
        hours, rest = divmod(whole // 60, 60)
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    days, rest = divmod(whole // 3600, 24)
    return f"{days} d {rest} h" if rest else f"{days} d"


def format_due(seconds: float) -> str:
    if seconds > 0:
        return f"in {format_duration(seconds)}"
    # Up to a poll or so late is normal: the task waits for the next claimer's poll.
    if seconds > -1:
        return "due now"
    return f"overdue {format_duration(seconds)}"


def clock(moment: datetime, now: datetime) -> Html:
    """Time of day in UTC (with the date when it is not today's), exact time on hover."""
    utc = moment.astimezone(UTC)
    same_day = utc.date() == now.astimezone(UTC).date()
    label = utc.strftime("%H:%M:%S") if same_day else utc.strftime("%Y-%m-%d %H:%M")
    iso = utc.isoformat(timespec="milliseconds")
    return html('<time datetime="{iso}" title="{iso}">{label}</time>', iso=iso, label=label)


def ago(moment: datetime, seconds: float) -> Html:
    iso = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return html(
        '<time datetime="{iso}" title="{iso}">{label} ago</time>',
        iso=iso,
        label=format_duration(seconds),
    )


def task_link(name: str) -> Html:
    # The history is JSON; the link still beats typing the URL. Percent-encoded: a task name
    # may hold any character (though the history route cannot take a "/", even encoded).
    return html('<a href="tasks/{path}/history">{name}</a>', path=quote(name, safe=""), name=name)


# --- sections -----------------------------------------------------------------------------


NUM = "num"  # a column of numbers or times: right-aligned, tabular figures


def _table(
    section_id: str,
    title: str,
    count: int,
    columns: list[tuple[str, str]],
    rows: list[Html],
    empty: str,
) -> Html:
    """A section with its table; ``columns`` are (label, CSS class) pairs."""
    head = join(html('<th class="{cls}">{label}</th>', cls=c, label=label) for label, c in columns)
    if not rows:
        rows = [
            html('<tr class="empty"><td colspan="{n}">{text}</td></tr>', n=len(columns), text=empty)
        ]
    return html(
        '<section id="{id}"><h2>{title} <span class="count">{count}</span></h2>'
        "<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>",
        id=section_id,
        title=title,
        count=count,
        head=head,
        rows=join(rows),
    )


def _running(tasks: list[TaskState], now: datetime) -> Html:
    running = sorted(
        (t for t in tasks if t.is_running and t.started_at is not None),
        key=lambda t: (t.started_at, t.name),
    )
    rows = [
        html(
            '<tr class="status-running"><td>{task}</td><td><code>{instance}</code></td>'
            '<td class="num">{started}</td><td class="num">{elapsed}</td></tr>',
            task=task_link(t.name),
            instance=t.running_instance or "",
            started=clock(t.started_at, now) if t.started_at else "",
            elapsed=format_duration(t.elapsed_seconds or 0.0),
        )
        for t in running
    ]
    head = [("Task", ""), ("Instance", ""), ("Started (UTC)", NUM), ("Elapsed", NUM)]
    return _table("running", "Running", len(rows), head, rows, "No task is running.")


def _pending(pending: list[PendingTask], tasks: list[TaskState], now: datetime) -> Html:
    rows = [
        html(
            '<tr class="{cls}"><td>{task}</td><td class="num">{next}</td>'
            '<td class="num">{due}</td></tr>',
            cls="overdue" if p.due_in_seconds <= -1 else "",
            task=task_link(p.name),
            next=clock(p.next_run_at, now),
            due=format_due(p.due_in_seconds),
        )
        for p in pending
    ]
    paused = [t for t in tasks if not t.enabled]
    rows += [
        html(
            '<tr class="paused"><td>{task}</td><td class="num">{next}</td>'
            '<td class="num">paused</td></tr>',
            task=task_link(t.name),
            next="running" if t.is_running else "—",
        )
        for t in paused
    ]
    head = [("Task", ""), ("Next run (UTC)", NUM), ("Due", NUM)]
    return _table("pending", "Pending", len(pending), head, rows, "No task is waiting.")


def _instances(instances: list[Instance], served_by: str, late_after: float) -> Html:
    def row(i: Instance) -> Html:
        marker = Html(' <span class="tag">this page</span>') if i.id == served_by else Html("")
        return html(
            '<tr class="status-{status}"><td><code>{id}</code>{marker}</td><td>{host}</td>'
            '<td class="num">{pid}</td><td class="num">{running}</td>'
            '<td class="num{late}">{heartbeat}</td>'
            '<td><span class="badge">{status}</span></td></tr>',
            status=i.status,
            id=i.id,
            marker=marker,
            host=i.hostname,
            pid=i.pid,
            running=i.running,
            late=" late" if i.heartbeat_age_seconds > late_after else "",
            heartbeat=f"{format_duration(i.heartbeat_age_seconds)} ago",
        )

    head = [
        ("Instance", ""),
        ("Host", ""),
        ("PID", NUM),
        ("Running", NUM),
        ("Heartbeat", NUM),
        ("Status", ""),
    ]
    return _table(
        "instances",
        "Instances",
        len(instances),
        head,
        [row(i) for i in instances],
        "No live instance: none runs the scheduler, or none has a recent heartbeat.",
    )


def _history(runs: list[TaskRun]) -> Html:
    def row(r: TaskRun) -> Html:
        duration = format_duration(r.duration_seconds)
        return html(
            '<tr class="status-{status}"><td>{task}</td><td><code>{instance}</code></td>'
            '<td><span class="badge">{status}</span></td><td class="num">{started}</td>'
            '<td class="num">{duration}</td><td class="error" title="{error}">{error}</td></tr>',
            status=r.status,
            task=task_link(r.task),
            instance=r.instance_id,
            started=ago(r.started_at, r.age_seconds),
            duration=f"{duration} so far" if r.status == "running" else duration,
            error=r.error or "",
        )

    head = [
        ("Task", ""),
        ("Instance", ""),
        ("Status", ""),
        ("Started", NUM),
        ("Duration", NUM),
        ("Error", ""),
    ]
    return _table("history", "Recent runs", len(runs), head, [row(r) for r in runs], "No runs yet.")


def render_fragment(snapshot: Snapshot, *, served_by: str, late_after: float) -> Html:
    """The live part of the page: what the script swaps in every REFRESH_SECONDS.
    ``served_by``: the id of the instance answering (its row is marked); ``late_after``: the
    heartbeat age, in seconds, past which an instance is shown late."""
    now = snapshot.recent.as_of
    tasks = snapshot.tasks.tasks
    running = sum(t.is_running for t in tasks)
    live = len(snapshot.instances.instances)
    summary = html(
        '<p class="summary"><b>{live}</b> live {instances} · <b>{running}</b> running · '
        "<b>{pending}</b> pending · database clock {now} UTC · served by <code>{served}</code>"
        "</p>",
        live=live,
        instances="instance" if live == 1 else "instances",
        running=running,
        pending=len(snapshot.tasks.pending),
        now=clock(now, now),
        served=served_by,
    )
    return html(
        '{summary}<div class="grid">{running}{pending}{instances}</div>{history}',
        summary=summary,
        running=_running(tasks, now),
        pending=_pending(snapshot.tasks.pending, tasks, now),
        instances=_instances(snapshot.instances.instances, served_by, late_after),
        history=_history(snapshot.recent.runs),
    )


# --- the page -------------------------------------------------------------------------------

STYLE = """
:root{--bg:#f5f6f8;--fg:#1c2128;--muted:#667080;--card:#fff;--line:#e2e5ea;--head:#f1f3f6;
--accent:#2864d8;--ok:#1d7f46;--ok-bg:#e6f4ec;--bad:#c0262d;--bad-bg:#fdecec;--warn:#9a5b00;
--warn-bg:#fff3dc;--run:#2864d8;--run-bg:#e8f0fd}
@media (prefers-color-scheme:dark){:root{--bg:#121519;--fg:#e2e6eb;--muted:#949daa;
--card:#1b1f25;--line:#2b3139;--head:#22272e;--accent:#7ea8ff;--ok:#62cf8e;--ok-bg:#17301f;
--bad:#ff7d7d;--bad-bg:#3a1c1f;--warn:#efb25a;--warn-bg:#382912;--run:#7ea8ff;--run-bg:#1a2942}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",sans-serif}
header{display:flex;align-items:center;gap:12px;padding:10px 24px;background:var(--card);
border-bottom:1px solid var(--line)}
h1{font-size:17px;margin:0}
#live-state{font-size:12px;color:var(--ok)}
#live-state::before{content:"\\25CF  "}
body.stale #live-state{color:var(--bad)}
nav{margin-left:auto;display:flex;gap:16px}
a{color:var(--accent);text-decoration:none}
a:hover{text-decoration:underline}
main{padding:14px 24px 8px;max-width:1440px;margin:0 auto}
.summary{margin:0 0 12px;color:var(--muted)}
.summary b{color:var(--fg)}
.grid{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:14px;align-items:start;
grid-template-areas:"running pending" "instances pending"}
#running{grid-area:running}
#pending{grid-area:pending}
#instances{grid-area:instances}
#history{margin-top:14px}
@media (max-width:900px){.grid{grid-template-columns:minmax(0,1fr);
grid-template-areas:"running" "pending" "instances"}}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;overflow:hidden}
h2{font-size:12px;font-weight:650;text-transform:uppercase;letter-spacing:.05em;
color:var(--muted);margin:0;padding:8px 12px}
.count{display:inline-block;min-width:20px;padding:0 6px;margin-left:4px;border-radius:9px;
background:var(--head);color:var(--fg);text-align:center;letter-spacing:0}
table{width:100%;border-collapse:collapse}
th,td{padding:3px 12px;text-align:left;white-space:nowrap;border-top:1px solid var(--line)}
th{font-size:12px;font-weight:600;color:var(--muted);background:var(--head)}
.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.badge{display:inline-block;padding:0 8px;border-radius:9px;font-size:12px;font-weight:600;
background:var(--head);color:var(--muted)}
.status-succeeded .badge,.status-active .badge{background:var(--ok-bg);color:var(--ok)}
.status-running .badge{background:var(--run-bg);color:var(--run)}
.status-cancelled .badge,.status-draining .badge{background:var(--warn-bg);color:var(--warn)}
tr.status-failed,tr.status-lost{background:var(--bad-bg)}
.status-failed .badge,.status-lost .badge{background:var(--bad);color:#fff}
.status-failed .error,.status-lost .error{color:var(--bad)}
td.error{width:100%;max-width:0;overflow:hidden;text-overflow:ellipsis}
.empty td{color:var(--muted);font-style:italic}
.paused td,.overdue td:last-child,.late{color:var(--warn)}
.tag{font-size:11px;padding:0 6px;border-radius:8px;background:var(--run-bg);color:var(--run)}
footer{max-width:1440px;margin:0 auto;padding:0 24px 16px;color:var(--muted);font-size:12px}
"""

SCRIPT = """
(() => {
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  let refreshed = 0;
  async function refresh() {
    try {
      const response = await fetch("FRAGMENT_PATH", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      live.innerHTML = await response.text();
      live.dataset.refreshed = String(++refreshed);
      document.body.classList.remove("stale");
      state.textContent = "live";
    } catch (error) {
      document.body.classList.add("stale");
      state.textContent = "not updating (" + error.message + "), retrying";
    }
  }
  // A hidden tab does not poll: no load on the database for a page nobody looks at.
  const loop = () => setTimeout(async () => {
    if (!document.hidden) await refresh();
    loop();
  }, INTERVAL_MS);
  loop();
})();
""".replace("FRAGMENT_PATH", FRAGMENT_PATH).replace("INTERVAL_MS", str(REFRESH_SECONDS * 1000))


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


# Only this module's script and stylesheet run; the script may fetch from this origin only.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tandem status</title>
<link rel="icon" href="data:,">
<noscript><meta http-equiv="refresh" content="{noscript_refresh}"></noscript>
<style>{style}</style>
</head>
<body>
<header>
<h1>Tandem</h1><span id="live-state">{state}</span>
<nav><a href="docs">API docs</a><a href="tasks">/tasks</a><a href="instances">/instances</a>\
<a href="metrics">/metrics</a></nav>
</header>
<main id="live" data-refreshed="0" aria-live="polite">{fragment}</main>
<footer>Times are UTC from the database clock. Updates every {interval} s\
<noscript> (JavaScript is off: the page reloads every {noscript_refresh} s)</noscript>.</footer>
<script>{script}</script>
</body>
</html>
"""


def render_page(snapshot: Snapshot, *, served_by: str, late_after: float) -> Html:
    """The whole page, complete on first render (see render_fragment for the arguments)."""
    return html(
        _PAGE,
        style=Html(STYLE),
        script=Html(SCRIPT),
        state="live",
        interval=REFRESH_SECONDS,
        noscript_refresh=NOSCRIPT_REFRESH_SECONDS,
        fragment=render_fragment(snapshot, served_by=served_by, late_after=late_after),
    )
