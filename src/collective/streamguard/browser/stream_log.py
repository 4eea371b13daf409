"""``@@stream-log``: a log followed like ``tail -F``, as text or server-sent events.

On the Plone site root (add-on installed) and on the Zope application root.
Parameters: ``log`` (a configured name, never a path), where to start
(``lines=N``: the last N lines; ``offset=N``: a byte offset; neither: the
end) and ``format=sse`` (or ``Accept: text/event-stream``).  A reconnecting
EventSource sends ``Last-Event-ID``: the byte offset after the last event it
got, so it gets exactly what it missed.
"""

import re

from AccessControl import Unauthorized
from AccessControl import getSecurityManager
from AccessControl.SpecialUsers import nobody
from Products.Five import BrowserView

from collective.streamguard.deployment import log_rules
from collective.streamguard.logs.follower import END_MARKER
from collective.streamguard.logs.follower import LogFollower
from collective.streamguard.logs.follower import LogUnavailable
from collective.streamguard.logs.rules import configured_logs
from collective.streamguard.logs.stream import HEARTBEAT
from collective.streamguard.logs.stream import LogStream
from collective.streamguard.logs.stream import piece_size
from collective.streamguard.permissions import VIEW_LOG_STREAMS
from collective.streamguard.streaming import site_settings
from collective.streamguard.streaming import stream_response
from collective.streamguard.streaming import untransformed_headers

NUMBER = re.compile(r"[0-9]{1,15}")
#: ``lines=`` beyond this is refused (400); the scan for them is bounded in
#: bytes too (follow.MAX_SCAN_BYTES).
MAX_LINES = 100_000


class LogAccessView(BrowserView):
    """Base of the log views: the permission check and plain-text errors."""

    def check_access(self):
        """None when the user may view log streams; else the 403 body.

        The pages are registered with zope2.View and check the add-on's
        permission here, because Plone answers an authenticated user who
        lacks a permission with a redirect, where we want a plain 403.
        Anonymous users still get Unauthorized: Plone sends them to log in.
        """
        security = getSecurityManager()
        if security.checkPermission(VIEW_LOG_STREAMS, self.context):
            return None
        user = security.getUser()
        if user is None or user is nobody or user.getUserName() == "Anonymous User":
            raise Unauthorized("Log in to view log streams.")
        return self.error(403, "You may not view log streams.")

    def error(self, status, message):
        # Plone's transforms (theming) would wrap the message in a page.
        untransformed_headers(self.request, "text/plain; charset=utf-8", status=status)
        return message + "\n"

    def logs(self):
        """``{name: path}`` of the logs this site can stream."""
        return self.all_logs()[0]

    def all_logs(self):
        """``(logs, unavailable)``: see ``logs.configured_logs``."""
        settings = site_settings()
        return configured_logs(getattr(settings, "log_files", None), log_rules())

    def end_marker(self):
        return getattr(site_settings(), "end_marker", None) or END_MARKER


class StreamLogView(LogAccessView):
    def __call__(self):
        denied = self.check_access()
        if denied is not None:
            return denied
        form = self.request.form
        logs, unavailable = self.all_logs()
        name = form.get("log")
        if isinstance(name, str) and name in unavailable:
            return self.error(
                404, f"The log {name} is configured but cannot be streamed: {unavailable[name]}"
            )
        if not isinstance(name, str) or name not in logs:
            known = ", ".join(sorted(logs)) or "none"
            return self.error(404, f"Unknown log. The logs here are: {known}.")
        try:
            offset, last_lines = self.start(form)
        except ValueError as error:
            return self.error(400, str(error))
        sse = form.get("format") == "sse" or "text/event-stream" in (
            self.request.getHeader("Accept") or ""
        )
        follower = LogFollower(
            logs[name],
            offset=offset,
            last_lines=last_lines,
            end_marker=self.end_marker(),
            max_piece=piece_size(sse),
        )
        try:
            follower.open()
        except LogUnavailable as error:
            return self.error(404, f"The log {name} cannot be read now: {error}")
        return stream_response(
            self.request,
            LogStream(follower, sse),
            "text/event-stream; charset=utf-8" if sse else "text/plain; charset=utf-8",
            heartbeat=HEARTBEAT if sse else None,
            label=f"log {name}",
            log=name,
            catch_up=True,
        )

    def start(self, form):
        """(offset, last_lines) from Last-Event-ID, ``offset`` or ``lines``."""
        last_event_id = self.request.getHeader("Last-Event-ID")
        if last_event_id is not None:
            if not NUMBER.fullmatch(last_event_id):
                raise ValueError("Last-Event-ID must be a byte offset.")
            return int(last_event_id), None
        for key in ("offset", "lines"):
            value = form.get(key)
            if value is None or value == "":
                continue
            if not isinstance(value, str) or not NUMBER.fullmatch(value):
                raise ValueError(f"{key} must be a whole number of at most 15 digits.")
            if key == "lines" and int(value) > MAX_LINES:
                raise ValueError(f"lines must be at most {MAX_LINES}.")
            return (int(value), None) if key == "offset" else (None, int(value))
        return None, None
