"""What the cluster tests' instances (``cluster.ClusterLayer``) load besides
the test views: settings the tests change while the instances run, a
producer that waits for a gate the test opens from outside the process, and
a page that writes.  Registered by ``cluster.zcml``.
"""

import json
import os
import re
import types

from Products.Five import BrowserView
from zope.interface import implementer

from collective.streamguard.interfaces import IStreamSettingsProvider
from collective.streamguard.streaming import stream_response
from collective.streamguard.tests.views import record

#: The instance's settings, a JSON object of IStreamGuardSettings' fields.
SETTINGS_ENV = "STREAMGUARD_CLUSTER_SETTINGS"
#: A directory where the test creates a file named by a tag to open that gate.
GATES_ENV = "STREAMGUARD_CLUSTER_GATES"
TAG = re.compile(r"[A-Za-z0-9-]{1,64}")


@implementer(IStreamSettingsProvider)
class FileSettings:
    """The settings in the JSON file ``$STREAMGUARD_CLUSTER_SETTINGS``,
    read again whenever the file changed (a Zope instance without Plone
    has no registry; the tests change limits while it runs)."""

    def __init__(self):
        self._seen = None
        self._settings = None

    def __call__(self):
        path = os.environ[SETTINGS_ENV]
        stat = os.stat(path)
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen != self._seen:
            with open(path) as f:
                self._settings = types.SimpleNamespace(**json.load(f))
            self._seen = seen
        return self._settings


def gate_is_open(tag):
    return os.path.exists(os.path.join(os.environ[GATES_ENV], tag))


class GatedWriteView(BrowserView):
    """``@@streamguard-cluster-write?tag=T``: a ``zodb=True`` server-sent
    event stream that marks the context with T, sends ``marked``, waits
    (parked) until the test opens gate T, and finishes: its final commit."""

    def __call__(self):
        tag = self.request.form.get("tag", "")
        if not isinstance(tag, str) or not TAG.fullmatch(tag):
            self.request.response.setStatus(400)
            return "tag: letters, digits and dashes\n"

        def producer(guard):
            session = guard.zodb
            guard.add_cleanup(lambda: record("cleanup", tag=tag, reason=guard.reason.value))
            record("start", tag=tag)
            session.context._streamguard_mark = tag
            yield "data: marked\n\n"
            while not gate_is_open(tag):
                if (yield from guard.idle(0.05)):
                    return

        return stream_response(
            self.request, producer, "text/event-stream", zodb=True, context=self.context
        )


class WriteMarkView(BrowserView):
    """``@@streamguard-cluster-mark?value=V``: a page that sets the context's
    mark to V in the request's own transaction."""

    def __call__(self):
        self.context._streamguard_mark = str(self.request.form.get("value", ""))
        self.request.response.setHeader("Content-Type", "text/plain")
        return "written\n"
