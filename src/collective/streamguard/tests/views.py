"""Streaming views for the functional tests (registered by test.zcml).

The WSGI server layer runs waitress in a thread of the test process, so the
producers report to ``EVENTS`` here and the tests read it directly.
"""
import threading
import time

from Products.Five import BrowserView

from collective.streamguard.streaming import stream_response


EVENTS = []
_lock = threading.Lock()
#: Tests set these to let a producer go on.
GATES = {}


def record(name, **fields):
    with _lock:
        EVENTS.append({"event": name, "time": time.monotonic(), **fields})


def events(name=None, **match):
    with _lock:
        found = list(EVENTS)
    return [
        e
        for e in found
        if (name is None or e["event"] == name)
        and all(e.get(k) == v for k, v in match.items())
    ]


def gate(tag):
    with _lock:
        return GATES.setdefault(tag, threading.Event())


class StreamView(BrowserView):
    """``@@streamguard-test-stream?tag=T&mode=M&type=T``.

    Modes: ``idle`` (one line, then waits for the client to leave),
    ``gated`` (one line, then waits for the test's gate, then one more),
    ``finish`` (three lines), ``error`` (one line, then raises),
    ``heartbeat`` (waits with heartbeats), ``long`` (yields lines forever
    and never asks the guard).
    """

    def __call__(self):
        form = self.request.form
        tag = form.get("tag", "")
        mode = form.get("mode", "idle")
        content_type = form.get("type", "text/plain; charset=utf-8")
        options = {}
        if "max_duration" in form:
            options["max_duration"] = float(form["max_duration"])
        if mode == "heartbeat":
            options.update(heartbeat=b": heartbeat\n\n", heartbeat_interval=0.2)
        if mode == "gated":
            gate(tag).clear()

        def producer(guard):
            guard.add_cleanup(lambda: record("cleanup", tag=tag, reason=guard.reason.value))
            record("start", tag=tag)
            try:
                yield f"first line of {tag}\n"
                if mode == "finish":
                    yield "second\n"
                    yield "third\n"
                elif mode == "error":
                    raise ValueError("the producer failed on purpose")
                elif mode == "gated":
                    while not gate(tag).is_set():
                        if guard.wait(0.05):
                            return
                    yield "after the gate\n"
                elif mode == "long":
                    # A naive producer that never asks the guard: the guard
                    # must stop it at a yield.
                    n = 0
                    while True:
                        n += 1
                        yield f"line {n}\n"
                        time.sleep(0.01)
                else:
                    stopped = yield from guard.idle()
                    record("idle-returned", tag=tag, stopped=stopped)
            except GeneratorExit:
                record("generator-exit", tag=tag)
                raise
            finally:
                record("producer-finally", tag=tag)

        return stream_response(self.request, producer, content_type, **options)
