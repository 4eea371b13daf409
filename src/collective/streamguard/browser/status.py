"""``@@stream-status``: the live streams and how streams ended, for managers."""

import json
from datetime import datetime
from datetime import timezone

from Products.Five import BrowserView

from collective.streamguard.deployment import instance_name
from collective.streamguard.streaming import untransformed_headers
from collective.streamguard.streams import live_streams
from collective.streamguard.zodb import open_sessions


def status(environ=None):
    """The process's streams as plain data (``environ``: of the request
    that asks, for the instance's name)."""
    snapshot = live_streams.snapshot()
    return {
        # Counts and limits are this process's: in a cluster, every
        # instance answers for itself.
        "instance": instance_name(environ),
        "scope": "instance",
        "live": [
            {
                "id": record.id,
                "log": record.log,
                "label": record.label,
                "user": record.user,
                "client": record.client,
                "probe": record.probe,
                "started": datetime.fromtimestamp(record.started, timezone.utc).isoformat(),
                "bytes_sent": record.bytes_sent,
                # Parked: the hub watches it, no thread; else it holds one
                # (it runs now, or it cannot park).
                "parked": record.is_parked,
                "thread": "parked" if record.is_parked else "holds a thread",
            }
            for record in sorted(live_streams.live(), key=lambda r: r.id)
        ],
        "parked": snapshot["parked"],
        "holding_a_thread": snapshot["holding_a_thread"],
        "ended": snapshot["ended"],
        "refused": snapshot["refused"],
        "open_zodb_sessions": open_sessions(),
    }


class StreamStatusView(BrowserView):
    """HTML in the site's look; ``?format=json`` for scripts and monitoring."""

    def __call__(self):
        self.data = status(self.request.environ)
        if self.request.form.get("format") == "json":
            untransformed_headers(self.request, "application/json; charset=utf-8")
            return json.dumps(self.data)
        return self.index()
