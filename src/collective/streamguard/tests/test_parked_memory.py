"""What a parked stream keeps alive, on a real Plone site behind a real waitress.

A parked stream lives for hours with no thread: what it keeps is memory per
stream, thousands of times over (``benchmarks/parked_memory.py`` measures
it).  Once parked, it must not reach its request's objects (Zope's request
and response, the WSGI environ, waitress' channel and request parser); once
ended, its status record (which its finalizer keeps) must not reach it.

Reachability, not death: waitress' worker keeps the last task it ran, and
Zope's thread-locals the last request, until the thread serves another.
"""

import gc
import sys
import threading
import types
import weakref

from zope.component import getGlobalSiteManager
from zope.component import provideHandler
from ZPublisher.interfaces import IPubStart

from collective.streamguard.hub import Hub
from collective.streamguard.logs.inotify import SharedInotify
from collective.streamguard.parking.scheduler import Scheduler
from collective.streamguard.streams import LiveStreams
from collective.streamguard.streams import live_streams
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import LogTestCase
from collective.streamguard.tests.streamcases import parked

#: What every stream shares with the whole process: not entered.
SHARED = (type, types.ModuleType, Hub, Scheduler, LiveStreams, SharedInotify, threading.Thread)


def reachable(root):
    """Every object ``root`` reaches by references, {id: object}, without
    entering classes, modules (nor their globals) and what is SHARED."""
    module_dicts = {id(vars(module)) for module in list(sys.modules.values()) if module}
    seen = {id(root): root}
    todo = [root]
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if id(ref) in seen or id(ref) in module_dicts or isinstance(ref, SHARED):
                continue
            seen[id(ref)] = ref
            todo.append(ref)
    return seen


class TestWhatAParkedStreamKeeps(LogTestCase):
    def setUp(self):
        super().setUp()
        # The first request a waitress server publishes lets it park streams.
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)
        self.published = []
        provideHandler(self.on_publish, (IPubStart,))
        self.addCleanup(getGlobalSiteManager().unregisterHandler, self.on_publish, (IPubStart,))

    def on_publish(self, event):
        # In waitress' worker: weak references to the log stream's request.
        request = event.request
        if "stream-log" not in request.environ.get("PATH_INFO", ""):
            return
        channel = request.environ["waitress.client_disconnected"].__self__
        self.published.append(
            {
                "Zope's request": weakref.ref(request),
                "Zope's response": weakref.ref(request.response),
                "waitress' channel": weakref.ref(channel),
                "waitress' request parser": weakref.ref(channel.requests[0]),
            }
        )

    def test_a_parked_stream_reaches_none_of_its_request(self):
        sock, _head = self.follow("log=app&format=sse")
        self.assertTrue(wait_for(lambda: len(parked()) == 1), live_streams.live())
        (record,) = parked()
        (published,) = self.published
        reached = reachable(record.guard.parked)
        found = [
            name
            for name, ref in published.items()
            if ref() is not None and reached.get(id(ref())) is ref()
        ]
        self.assertEqual(found, [])
        environs = [o for o in reached.values() if type(o) is dict and "wsgi.input" in o]
        self.assertEqual(environs, [])
        # Still a stream: it follows the log, and its client is watched.
        self.write("a line while parked\n")
        sock.read_until(b"data: a line while parked")
        self.assertTrue(wait_for(lambda: len(parked()) == 1))
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))

    def test_an_ended_stream_is_not_kept_by_its_record(self):
        sock, _head = self.follow("log=app&format=sse")
        self.assertTrue(wait_for(lambda: len(parked()) == 1), live_streams.live())
        (record,) = parked()
        body = record.guard.parked.body
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        # The body's finalizer keeps the record until the body is collected:
        # a record that reached the body would keep it, its producer and its
        # connection for good.
        self.assertIsNone(record.guard)
        self.assertFalse(id(body) in reachable(record), "the ended stream's record reaches it")
