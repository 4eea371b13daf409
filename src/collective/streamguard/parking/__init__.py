"""Streams that wait without a thread: parked streams (server-neutral).

A stream whose producer waits in ``guard.idle()`` gives its worker thread
back; the hub watches its socket and timers, and its next steps run on the
server's workers when a wake condition fires.  ``docs/parked-streams.rst``
has the design; the server's part is ``collective.streamguard.waitress.park``.
"""
