"""A server-sent events client over a real socket, as EventSource reads a stream.

``EventStream.open(address, path, auth=..., last_event_id=...)`` sends the
request (``Last-Event-ID`` as a reconnecting EventSource sends it) and
parses the chunked ``text/event-stream`` body as the HTML standard says:
fields, ``data`` lines joined with a newline, comments skipped, an event
dispatched only once its blank line came, ``id`` kept as the last event id
also for an event without data.  Used by the resume tests of
``@@stream-log`` and meant for a cluster's too (reconnects through a
balancer): ``last_event_id`` is what the next connection sends.
"""

import dataclasses

from collective.streamguard.tests.helpers import HTTPClient


@dataclasses.dataclass
class Event:
    type: str
    data: str
    id: str | None  # the id field of this event, if it had one

    def json(self):
        import json

        return json.loads(self.data)


class EventStream:
    """One response of ``text/event-stream``, read event by event."""

    def __init__(self, client):
        self.client = client
        self.status, self.headers = client.head()
        self.pending = bytearray()  # dechunked bytes not yet a whole event
        #: What an EventSource would send as Last-Event-ID now.
        self.last_event_id = None
        #: The last id this response sent (None before its first).
        self.id_here = None
        self.ended = False  # the last chunk came

    @classmethod
    def open(cls, address, path, auth=None, last_event_id=None, headers=None, source=None):
        """Connect to ``address`` (from the local address ``source``, if
        given: a balancer keeps a client on one instance by it), ask for
        ``path``, read the head."""
        headers = dict(headers or {})
        headers.setdefault("Accept", "text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        client = HTTPClient(address, source=source)
        client.request(path, auth=auth, headers=headers)
        stream = cls(client)
        # As EventSource: the id it sent stands until an event brings another.
        stream.last_event_id = last_event_id
        return stream

    def close(self):
        self.client.close()

    @property
    def offset(self):
        """The byte offset of the last id this response sent
        (``<file>-<offset>[.<file>-<offset>...]``), or None before its first."""
        if not self.id_here:
            return None
        # Places in other files it carries come after a ".".
        return int(self.id_here.partition(".")[0].rpartition("-")[2])

    def _more(self, timeout):
        line = self.client.read_until(b"\r\n", timeout)
        size = int(line.split(b";")[0], 16)
        data = self.client.read_exactly(size + 2, timeout)[:-2]
        if size == 0:
            self.ended = True
        self.pending += data

    def next(self, timeout=10.0):
        """The next dispatched event, or None once the body ended."""
        while True:
            end = self.pending.find(b"\n\n")
            if end < 0:
                if self.ended:
                    return None
                self._more(timeout)
                continue
            block = bytes(self.pending[:end]).decode("utf-8")
            del self.pending[: end + 2]
            event = self._parse(block)
            if event is not None:
                return event

    def _parse(self, block):
        kind, data, event_id = "message", [], None
        for line in block.split("\n"):
            if line.startswith(":"):
                continue  # a comment: the heartbeat
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
        if event_id is not None:
            self.last_event_id = self.id_here = event_id
        if not data:
            return None  # retry:, a comment, or an id only
        return Event(kind, "\n".join(data), event_id)

    def events_until(self, predicate, timeout=10.0):
        """Events up to and including the first one ``predicate`` accepts."""
        events = []
        while True:
            event = self.next(timeout)
            if event is None:
                raise AssertionError(f"the stream ended before the event; got {events!r:.2000}")
            events.append(event)
            if predicate(event):
                return events
