"""The status page's HTML: Jinja templates in ``templates/`` (``page.html`` around
``fragment.html``), one inline stylesheet, one small inline script, no external assets.

Escaping is Jinja's, not ours: autoescape is on for every template, so every value is escaped,
quotes too (safe in attributes); only this module's stylesheet and script are marked safe.
``StrictUndefined`` makes a misspelt name fail the render instead of showing nothing. The
Content-Security-Policy allows only that stylesheet and script, by hash, so even markup
slipped in some other way would not run.

The first render is complete (the page is fully useful with JavaScript off); the script
re-fetches the fragment every REFRESH_SECONDS and swaps it in, counting the swaps in the
``data-refreshed`` attribute of ``#live``.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from tandem.status.service import Snapshot

REFRESH_SECONDS = 2
# Without JavaScript the browser reloads the page itself, less often.
NOSCRIPT_REFRESH_SECONDS = 10
FRAGMENT_PATH = "status/fragment"


# --- numbers and times (the templates' filters) ----------------------------------------------


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


def format_clock(moment: datetime, now: datetime) -> str:
    """Time of day in UTC, with the date when it is not ``now``'s day."""
    utc = moment.astimezone(UTC)
    same_day = utc.date() == now.astimezone(UTC).date()
    return utc.strftime("%H:%M:%S") if same_day else utc.strftime("%Y-%m-%d %H:%M")


def format_utc_iso(moment: datetime) -> str:
    """The exact time, for ``<time datetime>`` and the hover title."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def format_path_segment(value: str) -> str:
    # Not Jinja's urlencode: that one leaves "/" as it is, and a name must stay one segment.
    return quote(value, safe="")


# --- stylesheet, script and their hashes -------------------------------------------------------


def _read(name: str) -> str:
    return files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


STYLE = _read("page.css")
# page.js holds the placeholders; this module's constants fill them in.
SCRIPT = (
    _read("page.js")
    .replace("FRAGMENT_PATH", FRAGMENT_PATH)
    .replace("INTERVAL_MS", str(REFRESH_SECONDS * 1000))
)


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


# Only this module's script and stylesheet run; the script may fetch from this origin only.
# page.html puts STYLE and SCRIPT between their tags exactly, so these are their hashes.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


# --- rendering ------------------------------------------------------------------------------

_templates = Environment(
    loader=PackageLoader("tandem.status"),
    autoescape=True,
    undefined=StrictUndefined,
    # Block tags take their line with them: the templates can be laid out for reading.
    trim_blocks=True,
    lstrip_blocks=True,
    # They ship in the package and never change under a running process.
    auto_reload=False,
)
_templates.filters.update(
    duration=format_duration,
    due=format_due,
    clock=format_clock,
    utc_iso=format_utc_iso,
    path_segment=format_path_segment,
)
_templates.globals.update(
    refresh_seconds=REFRESH_SECONDS,
    noscript_refresh_seconds=NOSCRIPT_REFRESH_SECONDS,
    # The only markup marked safe: this module's own constants, allowed by the CSP's hashes.
    style=Markup(STYLE),  # noqa: S704  (a file of this package, hashed in the CSP)
    script=Markup(SCRIPT),  # noqa: S704  (a file of this package, hashed in the CSP)
)


# Loaded now, so that a broken template stops the app at start, not at its first request.
_page = _templates.get_template("page.html")
_fragment = _templates.get_template("fragment.html")


def _context(
    snapshot: Snapshot, served_by: str, late_after: float, auth_disabled: bool = False
) -> dict[str, Any]:
    tasks = snapshot.tasks.tasks
    return {
        "auth_disabled": auth_disabled,
        "now": snapshot.recent.as_of,
        "running": sorted(
            (t for t in tasks if t.is_running and t.started_at is not None),
            key=lambda t: (t.started_at, t.name),
        ),
        "running_count": sum(t.is_running for t in tasks),
        "pending": snapshot.tasks.pending,
        "paused": [t for t in tasks if not t.enabled],
        "instances": snapshot.instances.instances,
        "runs": snapshot.recent.runs,
        "schedules": snapshot.schedules.schedules,
        "schedules_total": snapshot.schedules.total,
        "served_by": served_by,
        "late_after": late_after,
    }


def render_fragment(snapshot: Snapshot, *, served_by: str, late_after: float) -> str:
    """The live part of the page: what the script swaps in every REFRESH_SECONDS.
    ``served_by``: the id of the instance answering (its row is marked); ``late_after``: the
    heartbeat age, in seconds, past which an instance is shown late."""
    return _fragment.render(_context(snapshot, served_by, late_after))


def render_page(
    snapshot: Snapshot, *, served_by: str, late_after: float, auth_disabled: bool = False
) -> str:
    """The whole page, complete on first render (see render_fragment for the arguments);
    ``auth_disabled`` puts a warning on top."""
    return _page.render(_context(snapshot, served_by, late_after, auth_disabled))
