"""collective.streamguard: streams that know when the browser has gone.

This module re-exports the public API: the plain-Python core at once, and
``stream_response`` (Zope) and its companions when first asked for, so
importing the package loads nothing from Zope or Plone.

The rooms; imports point one way, Plone -> Zope -> core, and only
``waitress/`` knows waitress' internals (``tests/test_imports.py`` checks
it by package; ``docs/architecture.rst`` follows one request through them):

core: detection and guarded streams (standard library only)
    ``connection``  is the client still there: ``ClientConnection`` and the API
    ``probes``      how each server (waitress, gunicorn, uWSGI, ZServer) is asked
    ``watcher``     one thread that runs ``on_disconnect`` callbacks
    ``guard``       ``StreamGuard`` and ``GuardedStream``: a producer under guard
    ``streams``     ``LiveStreams``: the process' live streams, caps, counters
    ``shutdown``    SIGTERM and SIGINT stop the live streams
    ``hub``         one thread that watches descriptors and timers (a reactor)
``parking/``: streams that wait without a thread (server-neutral core)
    ``stream``      ``ParkedStream``: its socket, state, steps, hub callbacks
    ``output``      ``OutQueue`` and the chunk framer: output on its way out
    ``scheduler``   the steps of resumed streams, on the server's workers
``logs/``: live logs, ``tail -F`` (core)
    ``rules``       which files may be streamed, by name
    ``source``      one file's descriptors and watches, shared by its followers
    ``follower``    ``LogFollower``: one log followed like ``tail -F``
    ``stream``      ``LogStream``: the producer of ``@@stream-log``
    ``inotify``     one inotify instance for every follower
    ``utf8``        the UTF-8 check of what is sent (``_utf8.c``)
``waitress/``: all waitress 3.0 knowledge
    ``channel``     where a request's channel, server and task are
    ``output``      large chunks straight onto a channel (``DirectOutput``)
    ``park``        a worker lets go of a stream; the hub takes its socket
    ``admission``   pages pass stream openings in waitress' task queue
Zope
    ``interfaces``  the settings schema, its defaults, the browser layer
    ``permissions`` the permission's name
    ``streaming``   ``stream_response()``: what a view returns to stream
    ``parkpolicy``  which streams park under waitress, and their caps
    ``zodb``        a producer's own ZODB connection and transaction
    ``deployment``  what zope.conf allows: the directories logs may be in
    ``browser.stream_log``, ``browser.status``: the views on a Zope root too
Plone (``plone.zcml``: registered only where Plone is)
    ``settings``    the registry records as the site's settings
    ``setuphandlers``  the uninstall step, hidden profiles
    ``csrf``        plone.protect's CSRF rule for ``zodb=True`` streams' commits
    ``browser.controlpanel``, ``browser.viewer``: the control panel, the viewer
    ``restapi``     ``@stream-status`` and the control panel for plone.restapi
                    (``restapi.zcml``: only where plone.restapi is installed)
"""

from collective.streamguard.connection import ClientConnection
from collective.streamguard.connection import ConnectionState
from collective.streamguard.connection import Verdict
from collective.streamguard.connection import client_connection
from collective.streamguard.connection import connection_state
from collective.streamguard.connection import is_browser_connection_open
from collective.streamguard.connection import on_disconnect
from collective.streamguard.connection import wait_for_disconnect
from collective.streamguard.guard import StreamError
from collective.streamguard.streams import EndReason
from collective.streamguard.streams import live_streams

#: The Zope part of the public API, imported when first asked for: this
#: module must stay importable without Zope (PEP 562).
_ZOPE_API = {"stream_response": "collective.streamguard.streaming"}


def __getattr__(name):
    module = _ZOPE_API.get(name)
    if module is None:
        raise AttributeError(f"module 'collective.streamguard' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "EndReason",
    "StreamError",
    "live_streams",
    "stream_response",
    "ClientConnection",
    "ConnectionState",
    "Verdict",
    "client_connection",
    "connection_state",
    "is_browser_connection_open",
    "on_disconnect",
    "wait_for_disconnect",
]
