"""Output on its way to a socket: one queue and one chunk framer.

``OutQueue`` holds what waits to be sent on one connection, in order:
memoryviews of chunks and their framing (never copied), and server buffers
(anything with ``get``/``skip``/``close`` and ``len``, such as what waitress
held when a stream parked).  A parked stream's output waits in one; the
waitress room hands one to waitress' I/O thread for large chunks
(``waitress.output.ChunkBuffer``).

``frame(chunk)`` and ``framed_parts(chunks)`` write HTTP/1.1 chunked
encoding as waitress' own ``task.write()`` does.

Plain Python: imports nothing from Zope or waitress.
"""

import collections
import logging

logger = logging.getLogger("collective.streamguard")

#: Parts below this size (chunk framing) go with the start of the next
#: part, not as a TCP segment of their own (waitress sets TCP_NODELAY).
SMALL_PART = 64
#: How much of the next part goes with a small one.
SMALL_PART_COMPANION = 64 << 10
#: Chunks up to this size are copied into their framing (one bytes object);
#: larger ones are framed by parts around them, without a copy.
FRAMED_COPY = 16 << 10

_last_framed = (None, None)  # (chunk, framed): replaced whole, never mutated


def frame(chunk):
    """``chunk`` in chunked encoding, as one bytes object.

    In a fan-out every stream of a log yields the same chunk object (the
    followers share their pieces and events), and every SSE stream beats
    with the same heartbeat: the last frame made is kept and shared."""
    global _last_framed
    last = _last_framed
    if last[0] is chunk:
        return last[1]
    framed = b"%X\r\n%s\r\n" % (len(chunk), chunk)
    _last_framed = (chunk, framed)
    return framed


def framed_parts(chunks):
    """Several chunks in chunked encoding, as parts: the chunks themselves
    are not copied (each part's framing goes with the next part)."""
    parts = []
    framing = b""  # the CRLF that ends the previous chunk, with the next size
    for data in chunks:
        parts += (framing + b"%X\r\n" % len(data), data)
        framing = b"\r\n"
    parts.append(framing)
    return parts


class OutQueue:
    """What waits to be sent on one connection, in order."""

    __slots__ = ("parts", "size")

    def __init__(self, parts=()):
        # A deque only while there is output: an idle stream's queue is
        # empty, and an empty deque costs 760 bytes.
        self.parts = None
        self.size = 0
        for part in parts:
            self.add(part)

    def __len__(self):
        return self.size

    def _parts(self):
        if self.parts is None:
            self.parts = collections.deque()
        return self.parts

    def add(self, data):
        """Queue bytes (a memoryview of them: no copy)."""
        if len(data):
            self._parts().append(memoryview(data))
            self.size += len(data)

    def add_chunk(self, chunk, chunked):
        """Queue a body chunk, framed when ``chunked``."""
        if not chunked:
            self.add(chunk)
        elif len(chunk) > FRAMED_COPY:
            self.add(b"%X\r\n" % len(chunk))
            self.add(chunk)
            self.add(b"\r\n")
        else:
            self.add(frame(chunk))

    def add_buffer(self, buffer):
        """Queue a server buffer (``get``/``skip``/``close``)."""
        if len(buffer):
            self._parts().append(buffer)
            self.size += len(buffer)
        else:
            buffer.close()

    def peek(self, limit):
        """The next bytes to send, without taking them: a whole queued
        chunk (the socket takes what it can), or up to ``limit`` bytes of a
        server buffer; b"" when there are none."""
        parts = self.parts
        while parts:
            head = parts[0]
            if type(head) is memoryview:
                if len(head) < SMALL_PART and len(parts) > 1 and type(parts[1]) is memoryview:
                    return b"".join((head, parts[1][:SMALL_PART_COMPANION]))
                return head
            if len(head):
                return head.get(limit)
            parts.popleft().close()
        return b""

    def consume(self, count):
        """Take ``count`` bytes off the front (they were sent)."""
        self.size -= count
        parts = self.parts
        while count:
            head = parts[0]
            length = len(head)
            if count < length:
                if type(head) is memoryview:
                    parts[0] = head[count:]
                else:
                    head.skip(count, True)
                return
            count -= length
            parts.popleft()
            if type(head) is not memoryview:
                head.close()
        if not parts:
            self.parts = None

    def send(self, sock, limit=256 << 10):
        """Send without blocking; True once empty.  Raises OSError when the
        client has gone."""
        while self.parts:
            data = self.peek(limit)
            if not data:
                return False  # a server buffer that gives nothing to this thread
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            self.consume(sent)
            if sent < len(data):
                return False
        return True

    def close(self):
        """Drop what is queued (closing server buffers)."""
        parts, self.parts = self.parts, None
        for part in parts or ():
            if type(part) is not memoryview:
                try:
                    part.close()
                except Exception:
                    logger.exception("closing a queued buffer failed")
        self.size = 0
