"""Parked streams that wait in one state: one send loop for all of them.

A ``ParkedGroup`` holds parked streams whose producers are in the same
state (the followers of one log, at the same place of it), so that the
same bytes can be sent to all of them by one loop over their sockets, in
the hub's thread, with no Python per stream beyond its ``send()``.  Who
made the group keeps its state: an opaque ``token`` (for a log's
``FanOut``, the followers' shared state and change count), handed to
``restore(item, token)`` when a stream leaves the group, so that the
producer's own state catches up with what it was sent meanwhile.

The rules (``ParkedStream`` keeps them):

- A stream is in a group only while it is parked in ``idle()`` with
  nothing queued and nothing ending it; every change of that (a resume, a
  wake step, a timer's resume, its close) takes it out of the group first,
  under its own lock, then the group's (that order, always).
- A grouped stream's socket is written in the hub's thread only (the group
  loop, a heartbeat); its queue, its counters and its producer are not
  touched until it leaves.
- What the group sent is settled into the stream when it leaves (its bytes,
  its counters, the time of its last output) and at its timers.

Why: one new line of a log followed by 10,000 parked viewers cost 3-4 us of
Python per viewer around its ``send()`` (``benchmarks/bench_fanout_python.py``),
mostly in touching each viewer's objects (stream, guard, follower, queue,
lock), and the fan-out stayed near 1.5x the time the stdlib asyncio server
takes (``benchmarks/bench_parked_streams.py``).  Here a viewer costs its
send.

Plain Python: imports nothing from Zope or waitress.
"""

import threading
import time

from collective.streamguard.parking.output import frame


class ParkedGroup:
    """Parked streams sent the same bytes together (see the module).

    ``admit(item, token)``: whether the producer of a stream that asks to
    join (``item``: what it joins with) is in the state ``token`` says,
    asked with the stream's lock and the group's held; True lets it in.
    ``restore(item, token)``: called, with the leaving stream's lock held,
    for each stream that leaves, so that its producer takes the state
    ``token`` says.
    """

    def __init__(self, token, admit, restore):
        self.lock = threading.Lock()
        #: What the members' producers are at (the creator's; see restore).
        self.token = token
        self.admit = admit
        self.restore = restore
        # socket -> ParkedStream: the loop touches the sockets only.
        self._chunked = {}  # HTTP/1.1: sent framed
        self._plain = {}  # HTTP/1.0: the body ends with the connection
        #: What every member was sent since the group began: bytes, sends,
        #: and the time of the last.  A member settles the difference from
        #: when it joined (``ParkedStream.settle_group``).
        self.bytes_sent = 0
        self.sends = 0
        self.last_output = 0.0
        # ParkedStream -> the part of the last send its socket did not take.
        self._short = {}
        self._failed = set()

    def __len__(self):
        return len(self._chunked) + len(self._plain)

    def add(self, parked):
        """``parked`` joins (its lock and ours held): ``ParkedStream.join_group``."""
        (self._chunked if parked.chunked else self._plain)[parked.sock] = parked

    def remove(self, parked):
        """``parked`` leaves (its lock and ours held): what the last send
        left for it to queue (a memoryview, or None), and whether its socket
        failed."""
        members = self._chunked if parked.chunked else self._plain
        members.pop(parked.sock, None)
        failed = parked in self._failed
        self._failed.discard(parked)
        return self._short.pop(parked, None), failed

    def take_one(self):
        """Take a member out of the group (its producer takes the group's
        token, as any leaving member's does) and return what it joined
        with; None when the group is empty."""
        while True:
            with self.lock:
                parked = next(iter(self._chunked.values()), None) or next(
                    iter(self._plain.values()), None
                )
            if parked is None:
                return None
            item = parked.leave_group()
            if item is not None:
                return item
            # It left meanwhile (another thread): take another.

    def send(self, chunk, token):
        """Send ``chunk`` (bytes, or None for nothing) to every member, and
        make ``token`` the members' state (the hub's thread).

        A member whose socket did not take it all, or failed, leaves the
        group afterwards, the rest queued in order (``EPOLLOUT`` sends it)
        or the stream ended."""
        size = len(chunk) if chunk else 0
        with self.lock:
            self.token = token
            self.sends += 1
            if not size:
                return  # the producers' state moves, nothing to send
            self.bytes_sent += size
            self.last_output = time.monotonic()
            short = self._short
            for members, data in ((self._chunked, frame(chunk)), (self._plain, chunk)):
                length = len(data)
                for sock in members:
                    try:
                        sent = sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        self._failed.add(members[sock])
                        continue
                    if sent != length:
                        short[members[sock]] = memoryview(data)[sent:]
            leaving = [*short, *self._failed]
        for parked in leaving:
            parked.leave_group_after_send()

    def dissolve(self):
        """Every member leaves, each producer taking the group's token; what
        they had joined with (the items), in order."""
        with self.lock:
            members = [*self._chunked.values(), *self._plain.values()]
        items = []
        for parked in members:
            item = parked.leave_group()
            if item is not None:  # else it left meanwhile (any thread)
                items.append(item)
        return items
