"""Zope integration of guarded streaming: ``stream_response()`` for views.

Under Zope's WSGI publisher ``response.write()`` buffers the whole response
(Zope issue 662); what streams is a body that provides
``IUnboundStreamIterator``, which the publisher hands to the server after
the request's transaction is over.  ``stream_response`` builds that body
around a producer, with the guard of ``collective.streamguard.guard``:

- headers for streaming: no Content-Length, ``Cache-Control: no-store``,
  ``X-Accel-Buffering: no`` (nginx), ``X-Content-Type-Options: nosniff``;
- plone.transformchain is told to leave the body alone: its transforms
  (Diazo, plone.protect's auto-CSRF parser) join any iterable body into one
  string, which for an endless stream hangs the worker inside the request's
  transaction;
- at most ``max_streams`` live streams that hold a thread per process
  (default: the server's threads minus one, so one thread always serves
  normal pages); the next gets 503 with ``Retry-After``.  Under waitress a
  stream that waits in ``guard.idle()`` parks instead and holds no thread
  while it waits (``collective.streamguard.parkpolicy``): those have their own
  cap, ``max_parked_streams``;
- ``zodb=True`` gives the producer its own ZODB connection and transaction
  (``collective.streamguard.zodb``);
- ``run_on="pool"`` runs the producer on the add-on's job pool
  (``collective.streamguard.jobs``), never on the server's threads; the
  request's stream relays its chunks and parks in between;
- on classic ZServer an iterator body would be drained by the asyncore main
  thread and freeze the whole server, so there the same view streams with
  ``response.write()`` from the worker thread instead.
"""

import functools
import json
import sys

from AccessControl.SecurityManagement import getSecurityManager
from Acquisition import aq_base
from zope.component import queryUtility
from zope.interface import implementer
from ZPublisher.Iterators import IUnboundStreamIterator

from collective.streamguard import jobs
from collective.streamguard.connection import client_connection
from collective.streamguard.guard import GuardedStream
from collective.streamguard.guard import StreamGuard
from collective.streamguard.interfaces import DEFAULT_HEARTBEAT_INTERVAL
from collective.streamguard.interfaces import DEFAULT_MAX_DURATION
from collective.streamguard.interfaces import DEFAULT_MAX_STREAMS_PER_USER
from collective.streamguard.interfaces import IStreamSettingsProvider
from collective.streamguard.interfaces import IStreamWritePolicy
from collective.streamguard.parkpolicy import hold_or_end
from collective.streamguard.parkpolicy import max_parked_streams
from collective.streamguard.parkpolicy import park_function
from collective.streamguard.streams import HELD
from collective.streamguard.streams import PARKABLE
from collective.streamguard.streams import EndReason
from collective.streamguard.streams import Refused
from collective.streamguard.streams import live_streams
from collective.streamguard.waitress.channel import channel_of
from collective.streamguard.zodb import ZODBSession

#: waitress' default; used where the server does not tell its thread count.
DEFAULT_THREADS = 4
#: zope.conf's ``zserver-threads`` default, for a ZServer we cannot ask.
ZSERVER_DEFAULT_THREADS = 2
RETRY_AFTER = 10
#: The environ key that tells plone.transformchain to leave a body alone.
TRANSFORMCHAIN_DISABLE = "plone.transformchain.disable"
TOO_MANY = "Too many live streams on this server; try again in a few seconds.\n"
TOO_MANY_FOR_USER = (
    "You have as many live streams open as one user may; close one, or try again later.\n"
)
TOO_MANY_WITH_ZODB = (
    "Too many live streams with a database connection of their own on this server; "
    "try again in a few seconds.  (At most the database's pool-size in zope.conf, "
    "less one per worker thread, live at once: raise pool-size for more.)\n"
)
#: The last event of a server-sent event stream that failed: EventSource
#: dispatches it as an ``error`` event, then reconnects.
SSE_ERROR_EVENT = b"event: error\ndata: the stream failed on the server\n\n"
QUEUE_FULL = "Too many jobs wait for this server's job pool; try again in a few seconds.\n"
WORKER_QUEUE_FULL = "Too many jobs wait for a worker; try again in a few seconds.\n"
WORKERS_UNAVAILABLE = "The workers' queue does not answer; try again in a few seconds.\n"
#: Where a producer runs: the thread that serves the stream (today's, the
#: default), the add-on's job pool, or a worker process.
RUN_ON = (None, "pool", "worker")
REFUSALS = {Refused.USER_LIMIT: TOO_MANY_FOR_USER, Refused.ZODB_BUSY: TOO_MANY_WITH_ZODB}


@implementer(IUnboundStreamIterator)
class StreamIterator(GuardedStream):
    """A guarded stream as Zope publishes it.

    It has ``__iter__``, ``__next__`` and ``close`` and deliberately no
    ``read``: with one, ``publish_module`` would wrap it in
    ``wsgi.file_wrapper``, which sends only up to a size measured once.
    """


def server_threads(environ):
    """The serving server's worker thread count: waitress' ``threads``,
    classic ZServer's ``zserver-threads``; else DEFAULT_THREADS."""
    channel = channel_of(environ)
    try:
        if channel is None and "channel.creation_time" in environ:
            # Classic ZServer: PubCore starts ZSERVER_THREADS workers, set
            # from zope.conf's zserver-threads (default 2).  Not imported:
            # a process that serves ZServer has loaded it.
            config = sys.modules.get("ZServer.Zope2.Startup.config")
            return int(getattr(config, "ZSERVER_THREADS", ZSERVER_DEFAULT_THREADS))
        return int(channel.server.adj.threads)
    except (AttributeError, TypeError, ValueError):
        return DEFAULT_THREADS


def default_max_streams(environ):
    """One stream fewer than the server has threads, so that one always
    serves normal pages."""
    return max(1, server_threads(environ) - 1)


def zodb_stream_limit(context, environ):
    """How many streams may hold a ZODB connection of their own at once:
    the database's connection pool (zope.conf ``pool-size``, 7 by default)
    less one for each worker thread, which serves pages with its own.  A
    parked ``zodb=True`` stream keeps its connection (and its object cache)
    while it waits; past the pool ZODB logs a warning at every open, and
    those lines would wake every stream that follows the event log."""
    jar = getattr(aq_base(context), "_p_jar", None)
    if jar is None:
        return 1  # ZODBSession refuses it with a clear error
    return max(1, jar.db().getPoolSize() - server_threads(environ))


def site_settings():
    """The current site's settings (``IStreamSettingsProvider``), or None."""
    provider = queryUtility(IStreamSettingsProvider)
    return provider() if provider is not None else None


def write_policy(request):
    """What ``IStreamWritePolicy`` says of this request's ``zodb=True``
    stream (in Plone: plone.protect's CSRF rule), or None: it may write."""
    policy = queryUtility(IStreamWritePolicy)
    return policy(request) if policy is not None else None


def _setting(explicit, defaults, name, fallback):
    if explicit is not None:
        return explicit
    value = getattr(defaults, name, None) if defaults is not None else None
    return fallback if value is None else value


def _zserver_response(response):
    # ZServer's response.stdout is a ChannelPipe with the request's channel;
    # under WSGI it is a BytesIO.
    return getattr(getattr(response, "stdout", None), "_channel", None) is not None


def stream_response(
    request,
    producer,
    content_type="text/plain; charset=utf-8",
    *,
    context=None,
    zodb=False,
    max_streams=None,
    max_streams_per_user=None,
    max_duration=None,
    heartbeat=None,
    heartbeat_interval=None,
    label=None,
    log=None,
    catch_up=False,
    run_on=None,
    job_args=None,
):
    """Return what a view returns to stream ``producer`` to the client.

    ``producer``: an iterable of ``bytes``/``str`` chunks (typically a
    generator), or a callable taking the ``StreamGuard`` and returning one.
    It runs after the request's transaction: capture plain values, or pass
    ``zodb=True`` and ``context`` to get ``guard.zodb`` (own connection,
    transaction, user and site; committed when the producer finishes,
    aborted otherwise).

    ``max_streams_per_user`` caps one user's live streams (429 beyond it).
    Settings not given here come from the ``IStreamSettingsProvider``
    utility (the Plone registry in a Plone site), else: ``max_streams`` =
    server threads minus one, ``max_duration`` = 3600 s, heartbeats every
    15 s when ``heartbeat`` bytes are given (0 turns a setting off).
    ``label`` (default: the URL) and ``log`` (the name of a followed log)
    are what status views show of the stream.  ``catch_up``: the producer
    starts by sending what was there when the request came, and clears
    ``guard.catching_up`` once it has; until then a client that shut down
    only its sending side after the request still gets it.

    ``run_on``: None (the serving thread), ``"pool"`` (the job pool) or
    ``"worker"`` (a worker process, ``collective.streamguard.workers``: the
    producer must be registered with ``register_producer``, and
    ``job_args``, a dict of JSON-able values, are its keyword arguments
    there; they are passed the same way on the other places).
    """
    if producer is None or not (callable(producer) or hasattr(producer, "__iter__")):
        raise TypeError(
            "stream_response() needs an iterable of bytes/str chunks or a "
            f"callable taking a StreamGuard, got {producer!r:.80}"
        )
    if zodb and context is None:
        raise TypeError("stream_response(zodb=True) needs the view's context")
    if run_on not in RUN_ON:
        raise ValueError(
            f"stream_response(run_on=...) takes None, 'pool' or 'worker', got {run_on!r:.40}"
        )
    on_worker = run_on == "worker"
    if on_worker:
        from collective.streamguard import workers

        workers.producer_name(producer)  # TypeError unless registered
        job_args = json.loads(json.dumps(job_args or {}))  # JSON-able, or TypeError
    if job_args:
        producer = functools.partial(producer, **job_args)
    response = request.response
    if request.get("REQUEST_METHOD", "GET") == "HEAD":
        # The headers of the stream, no stream: nothing runs, nothing is
        # counted, no slot is taken.
        _streaming_headers(request, content_type)
        _close_producer(producer)
        return ""
    defaults = site_settings()
    limit = _setting(max_streams, defaults, "max_streams", 0) or default_max_streams(
        request.environ
    )
    user_limit = _setting(
        max_streams_per_user, defaults, "max_streams_per_user", DEFAULT_MAX_STREAMS_PER_USER
    )
    user = getSecurityManager().getUser()
    user_name = user.getUserName() if user is not None else ""
    # A stream that may park (collective.streamguard.parkpolicy) does not count
    # against the thread cap unless it turns out to hold its thread.  A
    # plain iterable never sees the guard, so it can never park: it counts
    # from the start, and is refused before its first byte.
    # As a job (on the pool or a worker) the request's stream only relays
    # (it may always park), and the job's connection is counted by the
    # pool or the worker, not here.
    as_job = run_on in ("pool", "worker")
    may_park = as_job or takes_guard(producer)
    park = park_function(request.environ, defaults) if may_park else None
    kind = HELD if park is None else PARKABLE
    refused = live_streams.reserve(
        limit if park is None else max_parked_streams(defaults),
        _user_key(request, user),
        user_limit,
        kind=kind,
        zodb_limit=zodb_stream_limit(context, request.environ) if zodb and not as_job else None,
    )
    if refused is not None:
        _close_producer(producer)
        untransformed_headers(
            request,
            "text/plain; charset=utf-8",
            status=429 if refused is Refused.USER_LIMIT else 503,
        )
        response.setHeader("Retry-After", str(RETRY_AFTER))
        return REFUSALS.get(refused, TOO_MANY)
    job = None
    try:
        guard = StreamGuard(
            client_connection(request),
            max_duration=_setting(max_duration, defaults, "max_duration", DEFAULT_MAX_DURATION),
            heartbeat=heartbeat,
            heartbeat_interval=_setting(
                heartbeat_interval, defaults, "heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL
            ),
        )
        guard.catching_up = catch_up
        session = ZODBSession(context, request, write_policy(request)) if zodb else None
        stream_label = label or request.get("ACTUAL_URL") or request.environ.get("PATH_INFO", "")
        if as_job:
            if on_worker:
                job, refusal = worker_job(
                    request, producer, content_type, guard, session, stream_label, user_name
                )
            else:
                job, refusal = pool_job(
                    request, producer, content_type, guard, session, stream_label, user_name, user
                )
            if job is None:
                # Refused (its queue is full, or the workers' broker does
                # not answer): 503 before the first byte.
                live_streams.release(_user_key(request, user), kind, False)
                untransformed_headers(request, "text/plain; charset=utf-8", status=503)
                response.setHeader("Retry-After", str(jobs.retry_after()))
                return refusal
            producer, session = jobs.relay_producer(job), None
        stream = StreamIterator(
            producer,
            guard,
            setup=session.open if session is not None else None,
            label=stream_label,
            user=user_name,
            user_key=_user_key(request, user),
            client=request.environ.get("REMOTE_ADDR", ""),
            log=log or "",
            reserved=True,
            park=park,
            kind=kind,
            zodb=zodb and not as_job,
            error_chunk=SSE_ERROR_EVENT if is_event_stream(content_type) else None,
            direct_output=direct_output_for(request.environ),
        )
        if job is not None:
            job.stream_id = stream.record.id
            # Whatever ends the request's stream (the client left, max_duration,
            # shutdown, a dropped body) stops the job.
            jobs.cancel_with(guard, job.relay)
        if park is not None:
            guard.on_hold = hold_or_end(stream, limit)
    except BaseException:
        if job is not None:
            job.relay.cancel(EndReason.ERROR)
        live_streams.release(_user_key(request, user), kind, zodb and not as_job)
        raise

    _streaming_headers(request, content_type)
    if _zserver_response(response):
        return write_in_this_thread(response, stream)
    return stream


def pool_job(request, producer, content_type, guard, session, label, user_name, user):
    """``(job, None)``: the job that runs ``producer`` on the pool for the
    stream of ``guard``, admitted (it starts at the stream's first step).
    ``(None, message)`` when the pool's queue is full."""
    from collective.streamguard.deployment import job_pool_settings

    jobs.pool.configure(*job_pool_settings())
    relay = jobs.Relay(guard.wake)
    job = jobs.Job(None, relay, notice=queue_notice(content_type), label=label)
    try:
        jobs.pool.admit(job)
    except jobs.QueueFull:
        return None, QUEUE_FULL
    try:
        # The job's guard: its "client" is the relay, its clock the stream's.
        job_guard = StreamGuard(
            jobs.RelayConnection(relay),
            max_duration=guard.max_duration,
            live_streams=jobs.job_streams,
        )
        job.stream = GuardedStream(
            producer,
            job_guard,
            setup=session.open if session is not None else None,
            label=f"pool job: {label}",
            user=user_name,
            user_key=_user_key(request, user),
            client=request.environ.get("REMOTE_ADDR", ""),
            zodb=session is not None,
        )
    except BaseException:
        jobs.pool.withdraw(job)
        raise
    return job, None


#: The process's dispatch to worker processes, made when first needed.
_dispatch = None


def worker_dispatch():
    """This process' ``WorkerDispatch`` (zope.conf's broker and secret)."""
    global _dispatch
    from collective.streamguard import workers
    from collective.streamguard.deployment import worker_queue_size
    from collective.streamguard.deployment import worker_settings

    settings = worker_settings()
    if _dispatch is None or _dispatch.settings != settings:
        dispatch = workers.WorkerDispatch(workers.Broker(*settings))
        dispatch.settings = settings
        _dispatch = dispatch
    _dispatch.configure(worker_queue_size())
    return _dispatch


def current_worker_dispatch():
    """This process' ``WorkerDispatch`` if it has dispatched, else None."""
    return _dispatch


def worker_job(request, producer, content_type, guard, session, label, user_name):
    """``(job, None)``: the job that runs the registered ``producer`` in a
    worker process for the stream of ``guard``, admitted; dispatched at the
    stream's first step (after the request's transaction has committed).
    ``(None, message)`` when it is refused: the workers' queue is full, or
    its broker does not answer."""
    from collective.streamguard import workers

    args = {}
    if isinstance(producer, functools.partial):
        producer, args = producer.func, dict(producer.keywords)
    dispatch = worker_dispatch()
    relay = jobs.Relay(guard.wake)
    job = jobs.Job(None, relay, notice=queue_notice(content_type), label=label)
    job.pool = dispatch
    job.message = {
        "job": workers.new_job_id(),
        "producer": workers.producer_name(producer),
        "args": args,
        "session": session.plain() if session is not None else None,
        "may_write": write_policy(request) is None,
        "max_duration": guard.max_duration,
        "label": label,
        "user": user_name,
        "client": request.environ.get("REMOTE_ADDR", ""),
    }
    try:
        dispatch.admit(job)
    except jobs.QueueFull:
        return None, WORKER_QUEUE_FULL
    except workers.BrokerUnavailable:
        return None, WORKERS_UNAVAILABLE
    return job, None


def queue_notice(content_type):
    """How a queued job's client learns its place: ``notice(position,
    first)`` gives the chunk (position 0: it starts now), or None for
    content types that must not get extra bytes (CSV, JSON, binary)."""
    if is_event_stream(content_type):
        return _event_notice
    if content_type.split(";")[0].strip().lower() == "text/plain":
        return _text_notice
    return None


def _event_notice(position, first):
    if not position:
        return b"event: started\ndata: {}\n\n"
    return b"event: queued\ndata: %s\n\n" % json.dumps({"position": position}).encode()


def _text_notice(position, first):
    # One line, the first of the body: text has no way to take it back.
    return b"queued: position %d\n" % position if first and position else None


def direct_output_for(environ):
    """How a stream of this request writes large chunks straight onto the
    server's connection (waitress), or None."""
    if channel_of(environ) is None:
        return None
    from collective.streamguard.waitress.output import direct_output_for

    return direct_output_for


def takes_guard(producer):
    """True for a producer that is a callable taking the guard (it may wait
    in ``guard.idle()`` and park), False for a plain iterable."""
    return callable(producer) and not hasattr(producer, "__iter__")


def is_event_stream(content_type):
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


def _user_key(request, user):
    """Whose slots a stream counts against: the user, or for anonymous
    streams the client's address (all anonymous users share one name)."""
    if user is None or user.getUserName() == "Anonymous User":
        return "anonymous@" + request.environ.get("REMOTE_ADDR", "")
    return user.getUserName()


def untransformed_headers(request, content_type, status=None):
    """Headers of a response that no cache keeps, no browser sniffs, and
    Plone's transforms (theming, plone.protect's parser) leave alone: a
    stream, or a short text or JSON answer of the add-on's views."""
    request.environ[TRANSFORMCHAIN_DISABLE] = True
    response = request.response
    if status is not None:
        response.setStatus(status)
    response.setHeader("Content-Type", content_type)
    response.setHeader("Cache-Control", "no-store")
    response.setHeader("X-Content-Type-Options", "nosniff")


def _streaming_headers(request, content_type):
    untransformed_headers(request, content_type)
    # nginx: pass the stream on as it comes.
    request.response.setHeader("X-Accel-Buffering", "no")


def _close_producer(producer):
    # A producer that holds resources (a LogStream's open file) lets them
    # go at once when it will never run.
    close = getattr(producer, "close", None)
    if close is not None:
        close()


def write_in_this_thread(response, stream):
    """Classic ZServer: push the stream with ``response.write()`` now.

    ZServer's ``write`` pushes to the channel from this worker thread and
    silently drops data once the channel is closed; the guard's probe of
    the channel is what stops the producer.
    """
    try:
        for chunk in stream:
            if chunk:
                response.write(chunk)
    finally:
        stream.close()
    return ""
