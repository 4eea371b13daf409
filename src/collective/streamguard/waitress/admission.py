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

#: View names (the last path segment, ``@@`` removed) that open a stream
#: start so; the add-on's pages that do not are listed.
STREAM_VIEW_PREFIX = "stream-"
PAGES = frozenset({"stream-log-viewer", "stream-status"})


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
