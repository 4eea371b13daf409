"""``@@stream-log``: a log followed like ``tail -F``, as text or server-sent events.

On the Plone site root (add-on installed) and on the Zope application root.
Parameters: ``log`` (a configured name, never a path), where to start
(``lines=N``: the last N lines; ``offset=N``: a byte offset; neither: the
end) and ``format=sse`` (or ``Accept: text/event-stream``).  A reconnecting
EventSource sends ``Last-Event-ID`` (``resume=`` in the query does the same
for clients that cannot send headers): the id of the last event it got,
which names the file and the offset (``logs.position``).  Where that is a
place in the file followed here, the stream goes on from there exactly;
else it says so (``event: switch``) and starts as ``lines=`` says.
"""

import re

from AccessControl import Unauthorized
from AccessControl import getSecurityManager
from AccessControl.SpecialUsers import nobody
from Products.Five import BrowserView

from collective.streamguard.deployment import instance_name
from collective.streamguard.deployment import log_rules
from collective.streamguard.logs.follower import END_MARKER
from collective.streamguard.logs.follower import LogFollower
from collective.streamguard.logs.follower import LogUnavailable
from collective.streamguard.logs.position import ResumePoint
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
        resume = self.resume_point(form)
        if resume is not None:
            # An offset= is into whichever file the first request found:
            # a switched stream starts as lines= says, or at the end.
            offset = None
            last_lines = self.number(form, "lines")
        sse = form.get("format") == "sse" or "text/event-stream" in (
            self.request.getHeader("Accept") or ""
        )
        follower = LogFollower(
            logs[name],
            offset=offset,
            last_lines=last_lines,
            resume=resume,
            end_marker=self.end_marker(),
            max_piece=piece_size(sse),
        )
        try:
            follower.open()
        except LogUnavailable as error:
            return self.error(404, f"The log {name} cannot be read now: {error}")
        return stream_response(
            self.request,
            LogStream(
                follower,
                sse,
                instance=instance_name(self.request.environ),
                log=name,
                last_lines=last_lines,
            ),
            "text/event-stream; charset=utf-8" if sse else "text/plain; charset=utf-8",
            heartbeat=HEARTBEAT if sse else None,
            label=f"log {name}",
            log=name,
            catch_up=True,
        )

    def resume_point(self, form):
        """The ``ResumePoint`` of ``Last-Event-ID`` (or of ``resume=``), or
        None.  Never an error: an id that is none of ours is a point in no
        file, and the stream says so in its switch event."""
        last_event_id = self.request.getHeader("Last-Event-ID")
        if last_event_id is None:
            last_event_id = form.get("resume")
        if last_event_id is None or last_event_id == "":
            # EventSource sends no header before it got an id; "" is what
            # a client sends that has none (the viewer before any event).
            return None
        return ResumePoint.parse(last_event_id)

    def start(self, form):
        """(offset, last_lines) from ``offset`` or else ``lines``; raises
        ValueError for one that is not a whole number."""
        lines = self.number(form, "lines")
        offset = self.number(form, "offset")
        return (offset, None) if offset is not None else (None, lines)

    def number(self, form, key):
        """The whole number of ``form[key]``, or None; raises ValueError."""
        value = form.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not NUMBER.fullmatch(value):
            raise ValueError(f"{key} must be a whole number of at most 15 digits.")
        if key == "lines" and int(value) > MAX_LINES:
            raise ValueError(f"lines must be at most {MAX_LINES}.")
        return int(value)
