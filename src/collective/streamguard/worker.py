"""The worker process: ``streamguard-worker path/to/zope.conf``.

It starts Zope from the same zope.conf as the web instances (or one of its
own with the same ``<zodb_db>``: a ZEO client of the same storage, and the
same ``worker-broker`` and ``worker-secret``), loads the same ZCML (so that
the same producers are registered), and runs the jobs that web instances
dispatch (``stream_response(..., run_on="worker")``), one at a time.

Each job gets a ``GuardedStream`` whose guard's "client" is a
``RelayConnection``: the producer's API is the one it has in-process
(``guard.zodb``: its own connection, opened and synced for this job, as
the requesting user on the site; committed when it finishes, aborted
otherwise; end reasons; cleanups once).
"""

import argparse
import functools
import logging
import os
import socket
import sys

logger = logging.getLogger("collective.streamguard")


def job_stream(db, message, relay, worker="worker"):
    """The ``GuardedStream`` of ``message``'s job, on ``db``; its
    transactions name ``worker`` in the undo log."""
    from collective.streamguard import jobs
    from collective.streamguard import workers
    from collective.streamguard.guard import GuardedStream
    from collective.streamguard.guard import StreamGuard
    from collective.streamguard.zodb import WriteRefused
    from collective.streamguard.zodb import ZODBSession

    name = message["producer"]
    producer = workers.PRODUCERS.get(name)
    if producer is None:
        raise LookupError(f"no producer named {name!r} is registered in this worker")
    args = dict(message.get("args") or {})
    session = None
    if message.get("session") is not None:
        write_check = None
        if not message.get("may_write", True):

            def write_check(session):
                if session.registered_objects():
                    raise WriteRefused("its request may not write (CSRF)")

        session = ZODBSession.from_plain(db, message["session"], write_check)
        session.place = f"worker {worker}"
    guard = StreamGuard(
        jobs.RelayConnection(relay),
        max_duration=message.get("max_duration"),
        live_streams=jobs.job_streams,
    )
    return GuardedStream(
        functools.partial(producer, **args) if args else producer,
        guard,
        setup=functools.partial(open_fresh, db, session) if session is not None else None,
        label=f"worker job: {message.get('label', '')}",
        user=message.get("user", ""),
        user_key=message.get("user", ""),
        client=message.get("client", ""),
        zodb=session is not None,
    )


def open_fresh(db, session, guard):
    """Open ``session`` for a job's first step, seeing at least what the web
    instance had committed when it dispatched the job.

    The request's commit reaches this process as a ZEO invalidation, on
    ZEO's own connection, while the job came through the broker: the job
    can be first, and its connection then shows the state before that
    commit (``ClientStorage.sync()`` does nothing unless ``server-sync`` is
    on).  A round trip to the ZEO server first: the server sent the
    invalidation before its answer, and the client takes both in order.
    Seen once in the tests: a job read what an earlier request wrote."""
    ping = getattr(db.storage, "ping", None)  # a ZEO client's; else one process
    if ping is not None:
        ping()
    session.open(guard)


def set_niceness(nice):
    """Every thread of this process at niceness ``nice``; the niceness it
    has.  Linux keeps one per thread (new threads take their creator's),
    and ZEO's client thread is running already.  Lowering it needs
    privileges: without them it stays, with a warning."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as error:
            logger.warning("cannot set worker-nice %d: %s", nice, error)
            break
    return os.getpriority(os.PRIO_PROCESS, 0)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="streamguard-worker",
        description="Run collective.streamguard's worker jobs (run_on='worker').",
    )
    parser.add_argument("zope_conf", help="the zope.conf of this worker (a ZEO client)")
    parser.add_argument("--name", default=None, help="this worker's name (default: host:pid)")
    options = parser.parse_args(argv)
    if not os.path.isfile(options.zope_conf):
        parser.error(f"no such file: {options.zope_conf}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s"
    )
    import Zope2
    from Zope2.Startup.run import make_wsgi_app

    make_wsgi_app({}, options.zope_conf)
    app = Zope2.app()
    db = app._p_jar.db()
    app._p_jar.close()

    from collective.streamguard import workers
    from collective.streamguard.deployment import WorkersNotConfigured
    from collective.streamguard.deployment import worker_nice
    from collective.streamguard.deployment import worker_settings

    try:
        url, secret = worker_settings()
    except WorkersNotConfigured as error:
        parser.exit(2, f"streamguard-worker: {options.zope_conf}: {error}\n")
    name = options.name or f"{socket.gethostname()}:{os.getpid()}"
    nice = set_niceness(worker_nice())
    broker = workers.Broker(url, secret, worker=name)
    logger.info("streamguard worker %s serves jobs from the broker (nice %s)", name, nice)

    def runner(message):
        stream_for = functools.partial(job_stream, db, worker=name)
        workers.run_job(broker, message, stream_for, worker=name)

    broker.serve(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
