"""Zope integration of parked streams: which streams park, and their cap.

A stream parks (``parking``, watched by the ``hub``) only under waitress,
on a channel that ``waitress.park.install`` has switched; that happens on the first published
request of each server (an ``IPubStart`` subscriber: at process start there
is no server yet).  Parked streams have a cap of their own: what they use
is file descriptors, not threads.  The default is derived from the
process' open-files limit (``RLIMIT_NOFILE``, soft): what is left after
FDS_KEPT for the rest of Zope (its storage, logs, page connections), one
descriptor per stream: its client socket.  A parked log stream holds
nothing else: the followers of a path share its file and directory
(``logs.source.LogSource``), and are woken by a callback, not a descriptor.

A stream that was given a parkable slot but holds its thread after all (a
middleware between waitress and Zope, a producer that blocks in
``guard.wait()``, or one that keeps its thread for ``guard.HOLD_GRACE``
without parking) moves to a held slot, under the thread cap; when none is
left it ends at once as failed (ERROR, logged; its client sees no clean
end) rather than take the last thread.  A plain iterable never sees its
guard, so it can never park: ``stream_response`` gives it a held slot from
the start, before its first byte.
"""

import functools
import logging
import weakref

from collective.streamguard.streams import EndReason
from collective.streamguard.streams import live_streams
from collective.streamguard.waitress.channel import channel_of
from collective.streamguard.waitress.channel import server_of

logger = logging.getLogger("collective.streamguard")

FDS_KEPT = 512
FDS_PER_STREAM = 1

_installed = weakref.WeakSet()


def install_on_first_request(event):
    """``IPubStart`` subscriber: let the serving waitress park streams."""
    server = server_of(event.request.environ)
    if server is None or server in _installed:
        return
    _installed.add(server)
    from collective.streamguard.waitress import park as waitress_park

    waitress_park.install(server)


def default_max_parked_streams():
    """The parked-stream cap when the setting is 0: from RLIMIT_NOFILE."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 0
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, (soft - FDS_KEPT) // FDS_PER_STREAM)


def park_function(environ, settings):
    """``waitress.park.park`` where this request's stream may park, else None."""
    if settings is not None and getattr(settings, "park_streams", True) is False:
        return None
    if channel_of(environ) is None:
        return None
    from collective.streamguard import hub
    from collective.streamguard.waitress import park as waitress_park

    if not (hub.SUPPORTED and waitress_park.installed(environ)):
        return None
    return waitress_park.park


def max_parked_streams(settings):
    """The setting, but never more than the open-files limit allows: past
    it waitress' accept() fails with EMFILE, and it retries (and logs) in a
    busy loop."""
    value = getattr(settings, "max_parked_streams", 0) if settings is not None else 0
    derived = default_max_parked_streams()
    return min(value, derived) if value else derived


def hold_or_end(stream, thread_limit):
    """``guard.on_hold`` of a parkable stream: take a held slot, or end."""
    return functools.partial(_hold_or_end, stream, thread_limit)


def _hold_or_end(stream, thread_limit, why="it cannot park"):
    if not live_streams.hold(stream.record, thread_limit):
        # Ended as failed, so that its client can tell (no clean end of the
        # body, an SSE error event): it did not end normally.
        logger.warning(
            "stream %d holds a thread (%s) and no thread is left for it (max_streams): ending it",
            stream.record.id,
            why,
        )
        stream.guard.stop(EndReason.ERROR)
