"""Large body chunks handed to waitress' I/O thread without copying them.

A body chunk returned to waitress takes a long way to the socket: its task
frames it for chunked encoding (two concatenations, two copies), the channel
appends it to an OverflowableBuffer (a copy; past 1 MB queued, into a
temporary file) and reads it out again in 16 KiB pieces (a copy each), and
the worker thread sends it itself, inside ``write_soon()``, under the
channel's lock: the next chunk is not read while this one is sent.  A log
caught up from its start went at a third of the speed waitress serves the
same file with ``wsgi.file_wrapper`` (benchmarks/bench_follow_throughput.py).

waitress queues one kind of object as it is: its ``ReadOnlyFileBasedBuffer``,
which is what ``wsgi.file_wrapper`` makes, and its I/O thread takes the data
out with ``get()``/``skip()``.  ``ChunkBuffer`` is such a buffer over bytes
already in memory (the chunk framing and the chunk) and hands out
memoryviews of them: no copy, and one ``send()`` as large as the socket
takes.  Its ``get()`` gives nothing to the thread that queued it, so the
flush inside ``write_soon()`` leaves the sending to the I/O thread, and the
worker reads and checks the next chunk meanwhile.  For a producer that
sets ``guard.batch_output`` (``@@stream-log``'s does), chunks are held while
the I/O thread is busy and handed over together: the I/O thread holds the
channel's lock while it sends, and a worker waiting for that lock would not
be reading.  Held chunks go out before the producer sleeps in the guard,
before any ordinary chunk and at the end.

This is used only where it is exact: when waitress' own
``WSGITask.execute`` iterates the body itself (checked on the calling frame;
no middleware in between could see or change the bytes), once the headers
are out.  Written against waitress 3.0 (``SUPPORTED_SERIES``); with any
other release ``for_caller`` answers None and chunks take the ordinary way.
"""

import threading
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version

from collective.streamguard.parking.output import OutQueue
from collective.streamguard.parking.output import frame
from collective.streamguard.parking.output import framed_parts

try:
    from waitress.buffers import ReadOnlyFileBasedBuffer
    from waitress.channel import ClientDisconnected
    from waitress.task import WSGITask
except ImportError:  # no waitress: nothing here is used
    ReadOnlyFileBasedBuffer, WSGITask = object, None

    class ClientDisconnected(Exception):
        pass


def _waitress_series():
    try:
        return tuple(int(part) for part in version("waitress").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


#: The waitress releases whose internals this module was written against
#: and tested with; any other takes the ordinary way.
SUPPORTED_SERIES = {(3, 0)}
SUPPORTED = WSGITask is not None and _waitress_series() in SUPPORTED_SERIES


#: Bytes waitress may hold queued for one stream before the producer waits:
#: bounds memory per stream, and a slow client holds back the producer.
QUEUE_LIMIT = 4 * 1024 * 1024
#: Chunks are held back while the I/O thread still has more than this to
#: send, up to HELD_LIMIT bytes: then the worker hands them over in one
#: buffer instead of waiting for the channel's lock, which the I/O thread
#: holds while it sends (one chunk at a time would serialize reading and
#: sending again).
HANDOVER_BELOW = 256 * 1024
HELD_LIMIT = 4 * 1024 * 1024
RECHECK = 0.5


class ChunkBuffer(ReadOnlyFileBasedBuffer):
    """Bytes queued on a waitress channel as they are, sent by its I/O thread:
    waitress' buffer interface over an ``OutQueue``."""

    def __init__(self, parts):
        # No file: ReadOnlyFileBasedBuffer.__init__ is deliberately not run.
        self.queue = OutQueue(parts)
        self._queued_by = threading.get_ident()

    def __len__(self):
        return self.queue.size

    @property
    def remain(self):
        return self.queue.size

    def get(self, numbytes=-1, skip=False):
        # Nothing for the queuing thread: see the module's docstring.
        if threading.get_ident() == self._queued_by:
            return b""
        data = self.queue.peek(numbytes)
        if skip and data:
            self.queue.consume(len(data))
        return data

    def skip(self, numbytes, allow_prune=False):
        if numbytes > self.queue.size:
            raise ValueError(f"cannot skip {numbytes} bytes of {self.queue.size}")
        self.queue.consume(numbytes)

    def close(self):
        self.queue.close()


class DirectOutput:
    """Writes body chunks of one response straight onto its waitress channel."""

    def __init__(self, task):
        self.task = task
        self.channel = task.channel
        self._held = []
        self._held_bytes = 0

    @classmethod
    def for_caller(cls, frame):
        """A ``DirectOutput`` when ``frame`` is waitress' ``WSGITask.execute``
        iterating the body, else None."""
        if not SUPPORTED or frame is None:
            return None
        if frame.f_code is not WSGITask.execute.__code__:
            return None
        task = frame.f_locals.get("self")
        return cls(task) if isinstance(task, WSGITask) else None

    @property
    def headers_sent(self):
        """True once the status line and headers are queued."""
        return self.task.wrote_header

    def send_headers(self):
        """Queue the status line and headers now, as waitress does before a
        ``wsgi.file_wrapper`` body.  A stream that has nothing to send yet
        (a quiet log) would otherwise send nothing at all: waitress sends
        the headers with the first body bytes, and a proxy in front gives
        up (nginx: 504 after its 60 s ``proxy_read_timeout``)."""
        if not self.task.wrote_header:
            self.task.write(b"")

    def send_headers_with(self, chunk):
        """Queue the status line and headers with ``chunk``, the body's
        first bytes, as one piece: one send.  waitress' own ``Task.write``
        queues them apart, and each queueing sends (``send_bytes`` is 1), so
        the first chunk cost a second send (about 60 µs of CPU on loopback,
        a thousand times when a thousand viewers come back at once).

        True when sent so.  False when the body is neither chunked nor read
        to the connection's close (a HEAD, a 304): the headers are queued
        alone, and ``chunk`` takes waitress' ordinary way; or when nothing
        was queued (the headers are out, or ``start_response`` was not
        called): then ``send_headers()``."""
        task = self.task
        if task.wrote_header or not task.complete:
            return False  # send_headers() raises as waitress would
        # Sets chunked_response and close_on_finish: what Task.write would
        # do before its first queueing.
        header = task.build_response_header()
        task.wrote_header = True
        if not (task.has_body and (task.chunked_response or task.content_length is None)):
            self.channel.write_soon(header)
            return False
        # bytes(): frame() keeps the last chunk it framed by identity, and a
        # bytearray (a reused read buffer) may change under it.
        chunk = bytes(chunk)
        self.channel.write_soon(header + (frame(chunk) if task.chunked_response else chunk))
        return True

    def send_headers_quietly(self):
        """``send_headers()``; False, sending nothing, when the client has
        gone (the guard sees that; nobody is left to tell)."""
        try:
            self.send_headers()
        except ClientDisconnected:
            return False
        return True

    def ready(self):
        """True once the headers are out and the body is chunked or runs to
        the connection's close (an HTTP/1.0 client)."""
        task = self.task
        return (
            task.wrote_header
            and task.has_body
            and (task.chunked_response or task.content_length is None)
        )

    def end_unfinished(self):
        """End the response without the clean end of its body: no last
        chunk of a chunked body, and the connection closes.  A client can
        then tell that the stream failed (curl: "transfer closed with
        outstanding read data remaining").  ``WSGITask.finish`` sends the
        last chunk only while ``chunked_response`` is set.  Headers not out
        yet (the producer failed before its first chunk) go first: built
        after this, they would set ``chunked_response`` again, and the body
        would end cleanly."""
        task = self.task
        self.send_headers_quietly()
        task.chunked_response = False
        task.close_on_finish = True

    def write(self, data, stopping=None, batch=False):
        """Send ``data`` now or, with ``batch``, with the next chunks while
        the I/O thread is busy (``flush()`` sends what is held).  Raises
        waitress' ``ClientDisconnected`` once the client has gone."""
        self._held.append(data)
        self._held_bytes += len(data)
        if (
            not batch
            or self._held_bytes >= HELD_LIMIT
            or self.channel.total_outbufs_len < HANDOVER_BELOW
        ):
            self.flush(stopping, quiet=False)

    def flush(self, stopping=None, quiet=True):
        """Queue the status line and headers if they are not out yet, then
        the held chunks.  Waits while more than QUEUE_LIMIT bytes are
        queued, until the I/O thread has sent some or ``stopping()`` says to
        stop.  A gone client raises ``ClientDisconnected``; with ``quiet`` the
        chunks are dropped instead."""
        # Nothing leaves, and no stream waits, before its headers (no chunk
        # is held before them: ready() wants them out).
        if not self.send_headers_quietly() or not self._held:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        channel = self.channel
        if channel.total_outbufs_len > QUEUE_LIMIT:
            with channel.outbuf_lock:
                while channel.connected and channel.total_outbufs_len > QUEUE_LIMIT:
                    if stopping is not None and stopping():
                        break
                    # Notified by the I/O thread after each flush, and when
                    # the channel closes.  No pull_trigger(): with this much
                    # queued the I/O thread is already waiting to write.
                    channel.outbuf_lock.wait(RECHECK)
        parts = framed_parts(held) if self.task.chunked_response else held
        try:
            channel.write_soon(ChunkBuffer(parts))
        except ClientDisconnected:
            if not quiet:
                raise


#: ``DirectOutput.for_caller``, bound once: a stream keeps it, and a bound
#: method made per stream is one more object for the collector to track.
direct_output_for = DirectOutput.for_caller
