"""Pages pass stream openings in waitress' task queue.

waitress has one FIFO queue of tasks for its worker threads.  When an
instance restarts with a thousand viewers open, every EventSource comes
back within seconds and a thousand stream openings queue up; a page asked
for meanwhile waited behind all of them (41 s measured, issue 18).  A
stream opening is a normal request (Zope publishes it) until it parks, so
it needs a worker like any page; but nobody waits on a viewer's reconnect
the way a person waits on a page.

``PagesFirstQueue`` replaces the dispatcher's deque (``install``): it keeps
the requests that open a stream (``opens_stream``) in a queue of their
own, and while both kinds wait, workers take them in turn: a page never
waits behind more than one stream opening per worker, and stream openings
still get half of the workers, so a steady flow of pages cannot starve
them.  Everything else (pages, error responses, parked streams' steps)
keeps waitress' order.

What opens a stream is decided from the request alone, before Zope sees
it, with the rule the shipped balancer applies too (``etc/haproxy.cfg.in``):
``Accept`` names ``text/event-stream`` (every EventSource sends it), or the
view's name (the last path segment, without ``@@``) starts with
``stream-`` (``@@stream-log``, and the convention for an integrator's own
stream views, ``@@stream-export``: README, Deployment), except the add-on's
pages ``@@stream-log-viewer`` and ``@@stream-status``.
"""

import collections
import functools
import logging

#: View names (the last path segment, ``@@`` removed) that open a stream
#: start so; the add-on's pages that do not are listed.
STREAM_VIEW_PREFIX = "stream-"
PAGES = frozenset({"stream-log-viewer", "stream-status"})

logger = logging.getLogger("collective.streamguard")


def is_stream_request(path, accept):
    """True when a request for ``path`` with this ``Accept`` header opens a
    stream (see the module's docstring)."""
    if accept and "text/event-stream" in accept:
        return True
    name = path.rstrip("/").rpartition("/")[2]
    if name.startswith("@@"):
        name = name[2:]
    return name.startswith(STREAM_VIEW_PREFIX) and name not in PAGES


def opens_stream(task):
    """True when ``task`` (what waitress queues: a channel whose first
    request waits, or anything else) is a request that opens a stream."""
    requests = getattr(task, "requests", None)
    if not requests:
        return False
    request = requests[0]
    if request.error is not None:
        return False
    return is_stream_request(request.path or "", request.headers.get("ACCEPT", ""))


class PagesFirstQueue:
    """waitress' task queue (the deque methods its dispatcher uses), with
    stream openings in turn with everything else.  Used under the
    dispatcher's lock, as its deque was."""

    def __init__(self, tasks=()):
        self.others = collections.deque()
        self.openings = collections.deque()
        self._opening_next = False
        for task in tasks:
            self.append(task)

    def append(self, task):
        if opens_stream(task):
            self.openings.append(task)
        else:
            self.others.append(task)

    def popleft(self):
        if self.openings and (self._opening_next or not self.others):
            self._opening_next = False
            return self.openings.popleft()
        # Raises IndexError when empty, as deque.popleft does.
        task = self.others.popleft()
        self._opening_next = bool(self.openings)
        return task

    def __len__(self):
        return len(self.others) + len(self.openings)

    def __bool__(self):
        return bool(self.others) or bool(self.openings)

    def __iter__(self):
        yield from self.others
        yield from self.openings

    @property
    def waiting_openings(self):
        """How many stream openings wait for a worker."""
        return len(self.openings)


def install(dispatcher):
    """Give waitress' ``ThreadedTaskDispatcher`` a ``PagesFirstQueue``,
    keeping what waits now.  Idempotent."""
    with dispatcher.lock:
        if isinstance(dispatcher.queue, PagesFirstQueue):
            return dispatcher.queue
        dispatcher.queue = PagesFirstQueue(dispatcher.queue)
        return dispatcher.queue


class WaitingRoom:
    """The channels of one waitress map whose request waits for a worker,
    kept out of that map.

    waitress' I/O loop asks every channel of its map, at every pass, whether
    it is readable and writable.  A channel whose request waits for a
    worker has nothing to read (waitress reads no further request first)
    and nothing to send, yet under a burst of arrivals hundreds wait, and
    the loop passes over them one to two times per request served: 436-764
    entries swept per stream opened at N = 1,000, against 34-38 for a 404
    of the same view (``benchmarks/bench_arrivals.py``, benchmarks/README).
    Here they wait out of the map, and the loop's pass costs what the
    channels it can serve cost.

    ``enter`` runs in the I/O thread (``ParkingChannel.received``), ``leave``
    on the worker that takes the request (``ParkingChannel.service``), each
    under the channel's ``requests_lock``.  A channel back in the map before
    its request runs is what waitress expects: its writes, its end of
    request and a park's detach find it there.  waitress' connection limit
    counts the map; the server's ``readable`` counts the room as well
    (``admit``).  Servers that share a map (waitress' ``MultiSocketServer``:
    one listening socket per address) share its room.
    """

    def __init__(self, map):
        self.map = map
        self.channels = {}
        self.over_limit = False

    @classmethod
    def install(cls, server):
        """Give ``server`` (a waitress server) the room of its map, and a
        ``readable`` that counts it; the room.  In the server's I/O thread."""
        room = getattr(server, "waiting_room", None)
        if room is not None:
            return room
        for dispatcher in list(server._map.values()):
            room = getattr(dispatcher, "waiting_room", None)
            if room is not None:
                break
        else:
            room = cls(server._map)
        server.waiting_room = room
        server.readable = functools.partial(room.admit, server, server.readable)
        return room

    def __len__(self):
        return len(self.channels)

    def enter(self, channel):
        """Take ``channel`` out of the map: its request waits for a worker."""
        fileno = channel._fileno
        if self.map.get(fileno) is channel:
            del self.map[fileno]
            self.channels[fileno] = channel

    def leave(self, channel, back=True):
        """Take ``channel`` out of the room, if it waited here (True), and
        back into the map unless ``back`` is false (it is being closed)."""
        fileno = channel._fileno
        if self.channels.get(fileno) is not channel:
            return False
        if back:
            # Back before anything else looks for the channel in the map: a
            # plain store, atomic for the I/O thread's list(map.items()).
            self.map[fileno] = channel
        del self.channels[fileno]
        return True

    def admit(self, server, waitress_readable):
        """The server's ``readable()``: waitress' answer (its maintenance,
        its limit on the map), and no new connection while the map and the
        room together hold ``connection_limit`` of them."""
        accepting = waitress_readable()
        if not accepting:
            return False
        limit = server.adj.connection_limit
        if len(self.map) + len(self.channels) >= limit:
            if not self.over_limit:
                self.over_limit = True
                logger.warning(
                    "total open connections reached the connection limit (%d waiting "
                    "for a worker), no longer accepting new connections",
                    len(self.channels),
                )
            return False
        if self.over_limit:
            self.over_limit = False
            logger.info(
                "total open connections dropped below the connection limit, listening again"
            )
        return True


def accept_in_batches(server):
    """Let ``server`` (a waitress server) accept every waiting connection
    each time its listening socket is readable, up to its listen backlog
    (``backlog``, 1024 by default) per wake and within its connection
    limit.  In the server's I/O thread.

    Why: the kernel's backlog of accepted connections is first-come.  When
    a thousand viewers come back at once, a page's new connection waits
    there behind every one of them, and waitress takes one per pass of its
    loop: pages then waited up to 0.4-0.7 s, where ``PagesFirstQueue``
    would have let them pass at once.  Taken together, they reach the
    queue, where pages go first.  32 per wake was not enough once openings
    got cheaper: the workers then let go of the interpreter's lock less
    often, the I/O thread got it back less often, and a page's connection
    still waited up to 0.9 s in the backlog (bench_arrivals.py; measured
    by the time of its accept, benchmarks/README).  One backlog's worth
    empties a full backlog, and bounds one wake."""
    if getattr(server, "accepts_in_batches", False):
        return
    server.accepts_in_batches = True
    server.handle_accept = functools.partial(_accept_batch, server, server.handle_accept)


def _accept_batch(server, accept_one):
    # waitress' handle_accept() accepts one connection, or none when the
    # backlog is empty (EAGAIN): a channel joins the map for each one.
    for _ in range(max(1, int(server.adj.backlog))):
        before = len(server._map)
        accept_one()
        if len(server._map) == before or not server.readable():
            return
