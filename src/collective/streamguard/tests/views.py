"""Streaming views for the functional tests (registered by test.zcml).

The WSGI server layer runs waitress in a thread of the test process, so the
producers report to ``EVENTS`` here and the tests read it directly.
"""

import json
import os
import threading
import time

from Products.Five import BrowserView

from collective.streamguard.streaming import stream_response

EVENTS = []
_lock = threading.Lock()
#: Tests set these to let a producer go on.
GATES = {}


def record(name, **fields):
    event = {"event": name, "time": time.monotonic(), **fields}
    with _lock:
        EVENTS.append(event)
        # Servers run as subprocesses report through a file.
        path = os.environ.get("STREAMGUARD_TEST_EVENTS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(event) + "\n")


def events(name=None, **match):
    with _lock:
        found = list(EVENTS)
    return [
        e
        for e in found
        if (name is None or e["event"] == name) and all(e.get(k) == v for k, v in match.items())
    ]


def gate(tag):
    with _lock:
        return GATES.setdefault(tag, threading.Event())


class StreamView(BrowserView):
    """``@@streamguard-test-stream?tag=T&mode=M&type=T``.

    Modes: ``idle`` (one line, then records "idle" and waits for the client
    to leave),
    ``gated`` (one line, then waits for the test's gate, then one more),
    ``finish`` (three lines), ``error`` (one line, then raises),
    ``heartbeat`` (waits with heartbeats), ``long`` (yields lines forever
    and never asks the guard), ``busy`` (yields a line every 50 ms until
    the guard says stop, never parking), ``stale`` (uses a persistent object
    of the request, whose connection closed before the stream began).
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
        if mode == "stale":
            # A persistent object of the request, used in the producer as a
            # newcomer who forgot zodb=True would (a ghost: not in memory).
            from Acquisition import aq_base

            stale = self.context.unrestrictedTraverse("acl_users")
            aq_base(stale)._p_deactivate()

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
                elif mode == "stale":
                    yield f"{stale.getId()}\n"
                elif mode == "busy":
                    # Works (or sleeps) outside guard.idle(): it keeps its
                    # thread, though it could park.
                    n = 0
                    while not guard.stopping:
                        n += 1
                        yield f"busy {n}\n"
                        time.sleep(0.05)
                elif mode == "long":
                    # A naive producer that never asks the guard: the guard
                    # must stop it at a yield.
                    n = 0
                    while True:
                        n += 1
                        yield f"line {n}\n"
                        time.sleep(0.01)
                else:
                    record("idle", tag=tag)
                    stopped = yield from guard.idle()
                    record("idle-returned", tag=tag, stopped=stopped)
            except GeneratorExit:
                record("generator-exit", tag=tag)
                raise
            finally:
                record("producer-finally", tag=tag)

        return stream_response(self.request, producer, content_type, **options)


#: Set by the tests: the SQLAlchemy engine URL of their SQLite file.
SQL = {}


class ZODBStreamView(BrowserView):
    """``@@streamguard-test-zodb?tag=T&mode=M``: producers that write.

    ``write`` (mark the site, or the context where there is no site, then
    idle until the client leaves or the gate opens; ``finish=1``: end at
    once), ``batch`` (create documents, commit every 10, then idle), ``sql``
    (insert rows through a zope.sqlalchemy session, then idle).

    Its stream declares itself safe from CSRF (``IDisableCSRFProtection``),
    as these tests write on GET; ``csrf=check`` leaves plone.protect's rule
    to apply.
    """

    def __call__(self):
        form = self.request.form
        if form.get("csrf") != "check":
            from plone.protect.interfaces import IDisableCSRFProtection
            from zope.interface import alsoProvides

            alsoProvides(self.request, IDisableCSRFProtection)
        tag = form.get("tag", "")
        mode = form.get("mode", "write")
        count = int(form.get("count", "25"))
        # Plain values only: request.close() clears the form before the
        # producer runs.
        finish = bool(form.get("finish"))
        park = bool(form.get("park"))
        gate(tag).clear()

        def producer(guard):
            from AccessControl.SecurityManagement import getSecurityManager
            from zope.component.hooks import getSite

            session = guard.zodb
            guard.add_cleanup(lambda: record("cleanup", tag=tag, reason=guard.reason.value))
            record(
                "context",
                tag=tag,
                user=getSecurityManager().getUser().getId(),
                site_is_set=getSite() is session.site,
                context_path="/".join(session.context.getPhysicalPath()),
                jar_is_own=session.context._p_jar is session.connection,
            )
            if mode == "write":
                (session.site or session.context)._streamguard_mark = tag
                yield "marked\n"
                if finish and not park:
                    return
            elif mode == "batch":
                for n in range(count):
                    session.site.invokeFactory("Document", f"{tag}-{n}", title=f"{tag} {n}")
                    if (n + 1) % 10 == 0:
                        session.commit()
                        yield f"committed {n + 1}\n"
            elif mode == "sql":
                yield from _sql_rows(guard, tag)
            if park:
                yield from _parked_steps(guard, tag, finish)
                return
            while not gate(tag).is_set():
                if guard.wait(0.05):
                    return
            yield "done\n"

        return stream_response(
            self.request, producer, "text/plain", zodb=True, context=self.context
        )


def _parked_steps(guard, tag, finish):
    """``park=1``: wait in idle() (the stream parks and is resumed every
    50 ms, in whatever worker is free) until the gate opens; then write in
    that resumed step, and finish (``finish=1``) or idle until the end."""
    import transaction
    from AccessControl.SecurityManagement import getSecurityManager
    from zope.component.hooks import getSite

    session = guard.zodb
    threads = set()
    while not gate(tag).is_set():
        threads.add(threading.get_ident())
        if (yield from guard.idle(0.05)):
            return
    record(
        "resumed",
        tag=tag,
        user=getSecurityManager().getUser().getId(),
        site_is_set=getSite() is session.site,
        manager_is_own=transaction.manager.manager is session.transaction_manager,
        jar_is_own=session.context._p_jar is session.connection,
        threads=len(threads),
    )
    (session.site or session.context)._streamguard_resumed = tag
    yield "resumed\n"
    if finish:
        return
    while not (yield from guard.idle()):
        pass


def _sql_rows(guard, tag):
    from sqlalchemy import create_engine
    from sqlalchemy import text
    from sqlalchemy.orm import Session
    from zope.sqlalchemy import mark_changed
    from zope.sqlalchemy import register

    engine = create_engine(SQL["url"])
    session = Session(engine)
    register(session, transaction_manager=guard.zodb.transaction_manager)
    guard.add_cleanup(engine.dispose)
    guard.add_cleanup(session.close)
    for n in range(3):
        session.execute(text("INSERT INTO rows (tag, n) VALUES (:tag, :n)"), {"tag": tag, "n": n})
    # Textual SQL is not seen by zope.sqlalchemy: say that we wrote.
    mark_changed(session, transaction_manager=guard.zodb.transaction_manager)
    yield "inserted\n"


class MarkView(BrowserView):
    """``@@streamguard-test-mark``: the mark a ``write`` producer left."""

    def __call__(self):
        self.request.response.setHeader("Content-Type", "text/plain")
        return getattr(self.context, "_streamguard_mark", "")


class NaiveStreamView(BrowserView):
    """``@@streamguard-test-naive``: a log loop without the guard.

    It yields a first line, then waits for more log data that never comes,
    sleeping in a ``while True`` loop; it never asks whether the
    client is still there, so an abandoned one holds its thread forever.
    For the benchmark only.
    """

    def __call__(self):
        from zope.interface import implementer
        from ZPublisher.Iterators import IUnboundStreamIterator

        @implementer(IUnboundStreamIterator)
        class Body:
            def __init__(self):
                self.lines = self._lines()

            def _lines(self):
                yield b"first line\n"
                while True:
                    time.sleep(0.5)

            def __iter__(self):
                return self

            def __next__(self):
                return next(self.lines)

        self.request.response.setHeader("Content-Type", "text/plain")
        return Body()


class ProbeView(BrowserView):
    """``@@streamguard-test-probe``: "<state> <probe>" of this request's
    connection, asked inside the view (where uWSGI's fd is valid)."""

    def __call__(self):
        from collective.streamguard import connection_state

        verdict = connection_state(self.request)
        self.request.response.setHeader("Content-Type", "text/plain")
        return f"{verdict.state.value} {verdict.probe}\n"


#: What ``HoldView`` saw, by tag, for servers in the test process.
HELD = {}


class HoldView(BrowserView):
    """``@@streamguard-test-hold?tag=T``: keeps its worker thread until the
    test opens gate T or the client leaves (60 s at most).

    It leaves in ``HELD[T]`` the request, a copy of its environ taken
    before anything was cached in it, the connection that
    ``client_connection(request)`` found (``probe=0``: none asked, so the
    test can ask after the response ended), the response's stdout and
    ZServer's channel (``stdout._channel``), then
    ``released`` once it returns: "gate", "client gone" or "timeout".
    """

    def __call__(self):
        from collective.streamguard import client_connection

        tag = self.request.form.get("tag", "")
        ask = self.request.form.get("probe", "1") != "0"
        gate(tag).clear()
        held = HELD[tag] = {
            "tag": tag,
            "request": self.request,
            "environ": dict(self.request.environ),
            "stdout": self.request.response.stdout,
            # ZServer's ChannelPipe drops it when the response ends.
            "channel": getattr(self.request.response.stdout, "_channel", None),
            "thread": threading.current_thread().name,
        }
        held["connection"] = connection = client_connection(self.request) if ask else None
        released = "gate"
        deadline = time.monotonic() + 60
        while not gate(tag).wait(0.01):
            if connection is not None and not connection.is_open():
                released = "client gone"
                break
            if time.monotonic() > deadline:
                released = "timeout"
                break
        held["released"] = released
        self.request.response.setHeader("Content-Type", "text/plain")
        return f"released: {released}\n"


class PlainStreamView(BrowserView):
    """``@@streamguard-test-plain?tag=T&mode=M``: a plain generator producer,
    as a newcomer writes one from the README (it never sees the guard).

    Modes: ``sleep`` (a line, then ``time.sleep`` between checks of
    ``is_browser_connection_open``), ``wait_closed`` (a line, then
    ``connection.wait_closed(1.0)`` in a loop).
    """

    def __call__(self):
        from collective.streamguard import client_connection
        from collective.streamguard import is_browser_connection_open

        tag = self.request.form.get("tag", "")
        mode = self.request.form.get("mode", "sleep")
        connection = client_connection(self.request)
        environ = self.request.environ

        def body():
            record("start", tag=tag)
            try:
                yield f"first line of {tag}\n"
                while True:
                    if mode == "wait_closed":
                        if connection.wait_closed(timeout=1.0):
                            return
                    else:
                        time.sleep(0.05)
                        if not is_browser_connection_open(environ):
                            return
            finally:
                record("producer-finally", tag=tag)

        return stream_response(self.request, body())


#: Bytes made by ``flood`` producers, by tag.
FLOODED = {}


class PoolStreamView(BrowserView):
    """``@@streamguard-test-pool?tag=T&mode=M&run_on=pool``: busy producers,
    run on the job pool (``run_on=pool``) or in the serving thread (none).

    The README's own CSV export and batch job run on the pool in
    ``test_plone_pool``.  Modes: ``batch`` (create ``count``
    documents, commit every 10, one line each; at document ``hold`` it waits
    for the test's gate outside the guard, so that only its next chunk can
    stop it), ``busy`` (a line every 50 ms until the gate opens or the
    guard says stop), ``error`` (writes a mark, one line, then raises),
    ``whoami`` (the user and its permissions, as the producer sees them),
    ``flood`` (64 KiB chunks without end; bytes made in ``FLOODED``),
    ``sees`` (the request writes a mark on the site; the job reports
    whether it sees it).  ``max_duration`` is passed on.
    Every mode records where it ran (``start``: the thread's name).
    ``type`` sets the content type.  Its stream declares itself safe from
    CSRF (the tests write on GET).
    """

    def __call__(self):
        from plone.protect.interfaces import IDisableCSRFProtection
        from zope.interface import alsoProvides

        alsoProvides(self.request, IDisableCSRFProtection)
        form = self.request.form
        tag = form.get("tag", "")
        mode = form.get("mode", "busy")
        run_on = form.get("run_on") or None
        content_type = form.get("type", "text/plain; charset=utf-8")
        count = int(form.get("count", "25"))
        hold = int(form.get("hold", "-1"))
        gate(tag).clear()
        zodb = mode in ("batch", "error", "whoami", "sees")
        options = {}
        if "max_duration" in form:
            options["max_duration"] = float(form["max_duration"])
        if mode == "sees":
            # Written by the request: the job must see it.
            self.context._streamguard_request_mark = tag

        def producer(guard):
            import transaction

            session = guard.zodb
            guard.add_cleanup(lambda: record("cleanup", tag=tag, reason=guard.reason.value))
            record(
                "start",
                tag=tag,
                thread=threading.current_thread().name,
                manager_is_own=session is not None
                and transaction.manager.manager is session.transaction_manager,
            )
            try:
                if mode == "batch":
                    for n in range(count):
                        session.site.invokeFactory("Document", f"{tag}-{n}", title=f"{tag} {n}")
                        if (n + 1) % 10 == 0:
                            session.commit()
                        record("step", tag=tag, n=n)
                        yield f"created {n}\n"
                        if n == hold:
                            gate(tag).wait(30)
                elif mode == "busy":
                    n = 0
                    while not gate(tag).is_set():
                        n += 1
                        yield f"busy {n}\n"
                        if guard.wait(0.05):
                            return
                elif mode == "flood":
                    # 64 KiB chunks as fast as they are taken: how far it
                    # gets is what the client's reading lets through.
                    chunk = b"x" * (64 << 10)
                    while True:
                        FLOODED[tag] = FLOODED.get(tag, 0) + len(chunk)
                        yield chunk
                elif mode == "error":
                    session.site._streamguard_mark = tag
                    yield "one line\n"
                    raise ValueError("the job failed on purpose")
                elif mode == "sees":
                    seen = getattr(session.site, "_streamguard_request_mark", None)
                    record("sees", tag=tag, mark=seen)
                    yield f"{seen}\n"
                elif mode == "whoami":
                    from AccessControl.SecurityManagement import getSecurityManager

                    security = getSecurityManager()
                    site = session.site
                    record(
                        "whoami",
                        tag=tag,
                        user=security.getUser().getId(),
                        manage=bool(security.checkPermission("Manage portal", site)),
                        view=bool(security.checkPermission("View", site)),
                    )
                    yield f"{security.getUser().getId()}\n"
            except GeneratorExit:
                record("generator-exit", tag=tag)
                raise
            finally:
                record("producer-finally", tag=tag)

        return stream_response(
            self.request,
            producer,
            content_type,
            zodb=zodb,
            context=self.context,
            run_on=run_on,
            **options,
        )


# -- Producers registered for worker processes (run_on="worker") --------

from collective.streamguard.workers import register_producer  # noqa: E402


def _job_events(guard, tag):
    guard.add_cleanup(
        lambda: record("cleanup", tag=tag, reason=guard.reason.value, pid=os.getpid())
    )
    record("start", tag=tag, pid=os.getpid(), thread=threading.current_thread().name)


@register_producer("streamguard-test.csv")
def worker_csv(guard, tag="", count=2000):
    """CSV rows of the context's attributes ``sg_csv_N``, 64 KiB at most per
    chunk (the README's export, on Zope's own objects)."""
    import csv
    import io

    _job_events(guard, tag)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["n", "title", "path"])
    context = guard.zodb.context
    for n in range(count):
        writer.writerow([n, f"document {n}", "/".join(context.getPhysicalPath()) + f"/doc-{n}"])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@register_producer("streamguard-test.batch")
def worker_batch(guard, tag="", count=25, hold=-1):
    """Sets ``sg_<tag>_<n>`` on the context, committing every 10, a line
    each; after ``hold`` it waits for the client to leave."""
    _job_events(guard, tag)
    context = guard.zodb.context
    try:
        for n in range(count):
            setattr(context, f"sg_{tag}_{n}", n)
            if (n + 1) % 10 == 0:
                guard.zodb.commit()
            record("step", tag=tag, n=n)
            yield f"created {n}\n"
            if n == hold:
                while not guard.wait(1):
                    pass
                return
    except GeneratorExit:
        record("generator-exit", tag=tag)
        raise
    finally:
        record("producer-finally", tag=tag)


@register_producer("streamguard-test.sees")
def worker_sees(guard, tag=""):
    """What the request wrote on the context before the job started."""
    _job_events(guard, tag)
    seen = getattr(guard.zodb.context, "_streamguard_request_mark", None)
    record("sees", tag=tag, mark=seen)
    yield f"{seen}\n"


@register_producer("streamguard-test.error")
def worker_error(guard, tag=""):
    """Writes a mark, one line, then raises."""
    _job_events(guard, tag)
    setattr(guard.zodb.context, f"sg_{tag}_error", 1)
    yield "one line\n"
    raise ValueError("the job failed on purpose")


WORKER_PRODUCERS = {
    "csv": worker_csv,
    "batch": worker_batch,
    "sees": worker_sees,
    "error": worker_error,
}


class WorkerStreamView(BrowserView):
    """``@@streamguard-test-worker?tag=T&mode=M&run_on=worker``: the
    registered producers above, on a worker (``run_on=worker``), the pool
    (``pool``) or in the serving thread (none).  ``count``, ``hold`` are
    the producer's arguments; ``type`` the content type (default CSV)."""

    def __call__(self):
        form = self.request.form
        tag = form.get("tag", "")
        mode = form.get("mode", "batch")
        args = {"tag": tag}
        for name in ("count", "hold"):
            if name in form:
                args[name] = int(form[name])
        if mode == "sees":
            # Written by the request: the job must see it.
            self.context._streamguard_request_mark = tag
        return stream_response(
            self.request,
            WORKER_PRODUCERS[mode],
            # CSV by default: no queue notices in the body (tests compare it).
            form.get("type", "text/csv; charset=utf-8"),
            zodb=True,
            context=self.context,
            run_on=form.get("run_on") or None,
            job_args=args,
        )


@register_producer("streamguard-test.whoami")
def worker_whoami(guard, tag=""):
    """The user and a manager's permission, as the producer sees them."""
    from AccessControl.SecurityManagement import getSecurityManager

    _job_events(guard, tag)
    security = getSecurityManager()
    user = security.getUser()
    record(
        "whoami",
        tag=tag,
        user=user.getId(),
        manage=bool(security.checkPermission("View management screens", guard.zodb.context)),
    )
    yield f"{user.getId()}\n"


WORKER_PRODUCERS["whoami"] = worker_whoami


@register_producer("streamguard-test.flood")
def worker_flood(guard, tag=""):
    """64 KiB chunks without end; records the bytes made every MiB (and
    its job's id on a worker)."""
    _job_events(guard, tag)
    record("job", tag=tag, job_id=getattr(guard, "job_id", None))
    chunk = b"x" * (64 << 10)
    made = 0
    while True:
        made += len(chunk)
        if made % (1 << 20) == 0:
            record("made", tag=tag, made=made)
        yield chunk


WORKER_PRODUCERS["flood"] = worker_flood
