"""Busy producers in worker processes: huey over Redis, signed messages.

``stream_response(..., run_on="worker")`` runs a *registered* producer in a
separate worker process (``streamguard-worker``), which opens the same
database as a ZEO client.  The web side is the pool's, unchanged
(``jobs.Relay``, ``jobs.relay_producer``, ``jobs.cancel_with``): only the
"pool" of the job differs (``WorkerDispatch``) and a thread of the web
process (the *feeder*) moves the worker's chunks from Redis into the relay.

Why huey: it is maintained, small (one package, no broker of its own
beyond Redis), already used by Plone sites (collective.taskqueue2), and a
task that was taken from the queue is never run again unless asked
(``retries=0``): a worker killed mid-job does not silently rerun it.  Redis,
its broker, also carries each job's chunks, its cancel signal, the web
side's lease and the worker's heartbeat, under ``streamguard:<job>:*``:

``out``      list: the worker's items, ``c`` + chunk, ``s`` + worker name
             (started), ``e`` + end reason (its last);
``pending``  bytes pushed and not yet taken by the web side: the worker
             waits above ``RELAY_HIGH`` (backpressure); ``ack`` wakes it;
``cancel``   the web side's end reason: the producer stops at its next
             chunk or wait;
``lease``    set by the web side once the job is queued (a worker starts
             a job only under it), renewed every ``LEASE / 5`` s: a web
             process killed with -9 stops renewing it, and the worker
             cancels the job within ``LEASE`` + ``POLL`` seconds;
``beat``     set by the worker, renewed as often: a worker killed with -9
             lets it expire, and the web side ends the client's stream as
             failed (in its format) within ``LEASE`` + ``POLL`` seconds.

Security: huey's messages are not pickled here (a pickle from the broker
would run any code): ``SignedSerializer`` writes JSON and signs it with
HMAC-SHA256 under the deployment's secret (zope.conf), and the worker
refuses (logs once, never runs) a message whose signature is missing or
wrong.  A message names a producer registered in the worker's code
(``register_producer``) with JSON-able arguments, the site's path and the
user's id: never code.  Redis itself must be reachable only by the add-on:
``requirepass`` (or ACLs) and a loopback or private address; whoever can
write its keys can cancel a job or feed a stream, never start one.

Plain Python: imports nothing from Zope or waitress.
"""

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid

from collective.streamguard import jobs
from collective.streamguard.streams import EndReason

logger = logging.getLogger("collective.streamguard")

#: Seconds a web side's lease and a worker's heartbeat live unrenewed.
LEASE = 10
#: How often (seconds) both sides look at the broker when nothing comes.
POLL = 1
#: Keys of a job are dropped this long after it ended.
KEEP = 3600
#: Seconds a call to Redis may take (connecting, or an answer) before it
#: fails: longer than the blocking reads' POLL.  With it, a broker that
#: stops answering (its host gone, not only its process) is noticed too.
BROKER_TIMEOUT = POLL + 4
#: The default of zope.conf's ``worker-queue-size``: jobs that may wait
#: for a worker, counted across the cluster (``WorkerDispatch.admit``).
DEFAULT_QUEUE_SIZE = 16
#: The default of a worker's zope.conf ``worker-nice``: a worker on the
#: web instances' host leaves them the CPU when their pages need it.
DEFAULT_NICE = 10
QUEUE_NAME = "streamguard"
#: ``PRESENCE + name``: set by each worker while it serves (``LEASE``).
PRESENCE = "streamguard:worker:"
TASK_NAME = "streamguard.run_job"

#: Registered producers, by name: the only code a worker runs.
PRODUCERS = {}


def register_producer(name):
    """Decorator: ``fn(guard, **args)`` may be run on a worker as ``name``."""

    def register(fn):
        if PRODUCERS.get(name, fn) is not fn:
            raise ValueError(f"a producer named {name!r} is registered already")
        PRODUCERS[name] = fn
        fn.producer_name = name
        return fn

    return register


def producer_name(producer):
    """The registered name of ``producer``; TypeError if it has none."""
    name = getattr(producer, "producer_name", None)
    if name is None or PRODUCERS.get(name) is not producer:
        raise TypeError(
            "stream_response(run_on='worker') needs a producer registered with "
            f"collective.streamguard.workers.register_producer, got {producer!r:.80}"
        )
    return name


class BadSignature(ValueError):
    """A broker message without a valid signature: it is never run."""


def _key(secret):
    if not secret:
        raise ValueError("worker-secret is empty: set it in zope.conf's product-config")
    return hashlib.sha256(b"collective.streamguard workers\0" + secret.encode()).digest()


def sign(secret, payload):
    """``payload`` (bytes) with its HMAC-SHA256 signature before it."""
    return hmac.new(_key(secret), payload, hashlib.sha256).hexdigest().encode() + b":" + payload


def verify(secret, signed):
    """The payload of ``signed``; ``BadSignature`` unless it was signed with
    ``secret``."""
    signature, sep, payload = bytes(signed).partition(b":")
    expected = hmac.new(_key(secret), payload, hashlib.sha256).hexdigest().encode()
    if not sep or not hmac.compare_digest(signature, expected):
        raise BadSignature("a broker message without a valid signature")
    return payload


def _huey():
    # Imported when used: an instance that never runs on workers needs
    # neither huey nor redis (the [workers] extra).
    import huey
    import huey.registry
    import huey.serializer

    return huey


def broker_classes():
    huey = _huey()
    from huey.registry import Message

    class SignedSerializer(huey.serializer.Serializer):
        """JSON, signed (never pickle: see the module docstring)."""

        def __init__(self, secret):
            super().__init__()
            self.secret = secret

        def _serialize(self, data):
            if isinstance(data, Message):
                data = {"huey-message": list(data)}
            return sign(self.secret, json.dumps(data).encode())

        def _deserialize(self, data):
            data = json.loads(verify(self.secret, data))
            if isinstance(data, dict) and "huey-message" in data:
                return Message(*data["huey-message"])
            return data

    import redis

    class SignedHuey(huey.RedisHuey):
        """A huey whose consumer refuses unsigned messages (logged, dropped)
        and waits for a lost broker: one line when it goes, one when it is
        back, and it asks again every POLL seconds meanwhile (huey's own
        loop would log a traceback at every try)."""

        broker_lost = False

        def dequeue(self):
            asked = time.monotonic()
            try:
                message = super().dequeue()
            except (BadSignature, ValueError, TypeError) as error:
                logger.error("refused a broker message (not run): %s", error)
                return None
            except redis.RedisError as error:
                self._lost(error)
                # A blocking read's wait: huey's loop asks again at once.
                time.sleep(POLL)
                return None
            if message is None and time.monotonic() - asked >= BROKER_TIMEOUT:
                # huey takes a read that timed out for an empty queue; but
                # its blocking read waits POLL s, not BROKER_TIMEOUT: the
                # broker accepts connections and does not answer (stopped,
                # or its host hangs).  huey asks again at once.
                self._lost(f"no answer within {BROKER_TIMEOUT} s")
                return None
            if self.broker_lost:
                self.broker_lost = False
                logger.info("the broker answers again; taking jobs")
            return message

        def _lost(self, error):
            if not self.broker_lost:
                self.broker_lost = True
                logger.error("lost the broker (%s); asking again every %s s", error, POLL)

        def read_schedule(self, timestamp=None):
            # The consumer's scheduler looks every second (no job of ours
            # is ever scheduled): a lost broker is logged once by dequeue,
            # not with a traceback at every look.
            try:
                return super().read_schedule(timestamp)
            except redis.RedisError:
                return []

        def delete(self, key):
            # huey drops a task's revoke key after it ran (ours are never
            # revoked): without a broker there is none to drop, and no
            # traceback to log.
            try:
                return super().delete(key)
            except redis.RedisError:
                return False

    return SignedSerializer, SignedHuey


class Broker:
    """The huey queue and the Redis keys of jobs, for both sides."""

    def __init__(self, url, secret, name=QUEUE_NAME, worker="worker"):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        SignedSerializer, SignedHuey = broker_classes()
        # No retries inside redis-py (its default differs between versions):
        # a lost broker is an error at once, which both sides handle (the
        # bounds in the README hold).
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=BROKER_TIMEOUT,
            socket_connect_timeout=BROKER_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.huey = SignedHuey(
            name,
            results=False,
            serializer=SignedSerializer(secret),
            connection_pool=self.redis.connection_pool,
            read_timeout=POLL,
        )
        #: What runs a job in this process (the worker sets it).
        self.runner = None
        #: This process' name as a worker (``workers_up``; when it serves).
        self.worker = worker
        self.task = self.huey.task(retries=0, name=TASK_NAME)(self._run)

    def _run(self, message):
        if self.runner is None:
            raise RuntimeError("this process runs no streamguard jobs")
        self.runner(message)

    @property
    def queue_key(self):
        return self.huey.storage.queue_key

    @staticmethod
    def key(job_id, name):
        return f"streamguard:{job_id}:{name}"

    # -- web side --

    def dispatch(self, message):
        """Queue ``message`` (JSON-able, with its ``job`` id) for a worker,
        then give it its web side's lease.

        In that order: a worker starts a job only under its lease
        (``wait_for_lease``).  A Redis that hangs keeps what a connection
        sent before the call timed out, and runs it when it goes on: a job
        whose queueing timed out here (its client was told it failed) then
        reaches a worker, without a lease, and is never run.  With the lease
        first, it would have run until the lease expired, committing for
        nobody."""
        self.task(message)
        self.redis.set(self.key(message["job"], "lease"), b"1", ex=LEASE)

    def cancel(self, job_id, reason):
        pipe = self.redis.pipeline()
        pipe.set(self.key(job_id, "cancel"), (reason or EndReason.CLIENT_GONE).value, ex=KEEP)
        pipe.rpush(self.key(job_id, "ack"), b"x")
        pipe.expire(self.key(job_id, "ack"), KEEP)
        pipe.execute()

    def queued(self):
        """How many jobs wait in huey's queue for a worker (all instances')."""
        return self.redis.llen(self.queue_key)

    def position(self, job_id):
        """The place of the job in huey's queue (1: it is taken next), or
        0 when it is not there (a worker has it)."""
        items = self.redis.lrange(self.queue_key, 0, -1)
        marker = job_id.encode()
        for index, item in enumerate(items):
            if marker in item:
                # huey pushes on the left and takes from the right.
                return len(items) - index
        return 0

    def renew_lease(self, job_id):
        self.redis.set(self.key(job_id, "lease"), b"1", ex=LEASE)

    def worker_alive(self, job_id):
        return bool(self.redis.exists(self.key(job_id, "beat")))

    def take(self, job_id):
        """The worker's next item ``(kind, data)``, or None after POLL s."""
        item = self.redis.blpop([self.key(job_id, "out")], timeout=POLL)
        if item is None:
            return None
        value = item[1]
        return value[:1], value[1:]

    def taken(self, job_id, size):
        pipe = self.redis.pipeline()
        pipe.decrby(self.key(job_id, "pending"), size)
        pipe.rpush(self.key(job_id, "ack"), b"x")
        pipe.ltrim(self.key(job_id, "ack"), 0, 0)
        pipe.expire(self.key(job_id, "ack"), KEEP)
        pipe.execute()

    # -- worker side --

    def push(self, job_id, kind, data=b""):
        pipe = self.redis.pipeline()
        if kind == b"c":
            pipe.incrby(self.key(job_id, "pending"), len(data))
            pipe.expire(self.key(job_id, "pending"), KEEP)
        pipe.rpush(self.key(job_id, "out"), kind + data)
        pipe.expire(self.key(job_id, "out"), KEEP)
        pipe.execute()

    def pending(self, job_id):
        return int(self.redis.get(self.key(job_id, "pending")) or 0)

    def wait_ack(self, job_id):
        self.redis.blpop([self.key(job_id, "ack")], timeout=POLL)

    def beat(self, job_id, worker):
        self.redis.set(self.key(job_id, "beat"), worker.encode(), ex=LEASE)

    def end_beat(self, job_id):
        self.redis.delete(self.key(job_id, "beat"))

    def _cancel_and_lease(self, job_id):
        pipe = self.redis.pipeline()
        pipe.get(self.key(job_id, "cancel"))
        pipe.exists(self.key(job_id, "lease"))
        reason, lease = pipe.execute()
        if reason is not None:
            try:
                reason = EndReason(reason.decode())
            except ValueError:
                reason = EndReason.CLIENT_GONE
        return reason, bool(lease)

    def cancelled(self, job_id):
        """The web side's end reason, or None while it lives."""
        reason, lease = self._cancel_and_lease(job_id)
        if reason is None and not lease:
            logger.warning("job %s: its web side's lease expired; cancelled", job_id)
            return EndReason.CLIENT_GONE
        return reason

    def wait_for_lease(self, job_id, within=LEASE):
        """Before a job starts: None once its web side's lease is there,
        else why it must not run: the web side's end reason (it ended while
        the job waited), or ERROR when no lease came within ``within`` s.

        The web side sets the lease just after it queued the job
        (``dispatch``), so a worker may take a job a moment before its
        lease: it waits.  No lease at all means that side never learned the
        job was queued (the call timed out on a hung Redis, which ran the
        push later) or died before it could say so (kill -9)."""
        deadline = time.monotonic() + within
        pause = 0.005
        while True:
            reason, lease = self._cancel_and_lease(job_id)
            if reason is not None:
                return reason
            if lease:
                return None
            if time.monotonic() >= deadline:
                logger.warning(
                    "job %s: its web side never confirmed it was queued "
                    "(its dispatch failed there); not run",
                    job_id,
                )
                return EndReason.ERROR
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def serve(self, runner):
        """Run jobs as they come, one at a time, until SIGINT/SIGTERM; the
        worker says it is up (``workers_up``, as ``self.worker``) while it
        serves."""
        self.runner = runner
        name = self.worker
        stop = threading.Event()
        presence = threading.Thread(
            target=self._announce, args=(name, stop), name="streamguard-presence", daemon=True
        )
        presence.start()
        consumer = self.huey.create_consumer(workers=1, worker_type="thread", periodic=False)
        try:
            consumer.run()
        finally:
            stop.set()
            presence.join(BROKER_TIMEOUT + 1)
            try:
                self.redis.delete(PRESENCE + name)
            except Exception:  # noqa: S110 (it expires with LEASE anyway)
                pass

    def _announce(self, name, stop):
        # Renewed every LEASE / 5 s; a worker killed with -9 drops out of
        # ``workers_up`` within LEASE.  A lost broker is logged by the
        # consumer (``SignedHuey.dequeue``): not here again.
        info = json.dumps({"name": name, "since": time.time()})
        while not stop.is_set():
            try:
                self.redis.set(PRESENCE + name, info, ex=LEASE)
            except Exception:  # noqa: S110
                pass
            stop.wait(LEASE / 5)

    def workers_up(self):
        """The names of the workers that serve this broker now, sorted."""
        prefix = PRESENCE.encode()
        return sorted(
            key[len(prefix) :].decode("utf-8", "replace")
            for key in self.redis.scan_iter(match=PRESENCE + "*", count=1000)
        )


class BrokerUnavailable(Exception):
    """``WorkerDispatch.admit``: the broker did not answer."""


class WorkerDispatch:
    """The "pool" (``Job.pool``) of jobs that run on workers: admits a job
    while the workers' queue is below its bound, dispatches it at its web
    side's first step, and feeds its relay from Redis.

    The bound (``queue_size``, zope.conf's ``worker-queue-size``) counts
    the jobs that wait for a worker: those in huey's queue in Redis, which
    every web instance of the cluster shares (the workers serve them all,
    so a bound per instance would let N instances queue N times as many),
    plus this instance's admitted jobs not yet dispatched (their request's
    transaction is not over).  Two instances admitting at the same moment
    may both see room for one: the queue can pass the bound by the jobs
    admitted concurrently on other instances, never more."""

    def __init__(self, broker, queue_size=DEFAULT_QUEUE_SIZE):
        self.broker = broker
        self.queue_size = max(1, queue_size)
        self._lock = threading.Lock()
        self._live = {}  # web stream id -> worker name ("" until it starts)
        self._positions = {}  # web stream id -> its place in huey's queue
        self._admitted = set()  # jobs admitted here, not yet dispatched
        self._broker_down = False
        self.started = 0
        self.dispatched = 0
        self.refused = 0

    def configure(self, queue_size):
        """Change the bound (from the deployment's settings)."""
        self.queue_size = max(1, int(queue_size))

    def admit(self, job):
        """Take ``job`` in, or raise ``jobs.QueueFull`` when ``queue_size``
        jobs wait for a worker already, ``BrokerUnavailable`` when Redis
        does not answer (the view answers 503 to both)."""
        try:
            waiting = self.broker.queued()
        except Exception as error:
            with self._lock:
                self.refused += 1
                first, self._broker_down = not self._broker_down, True
            if first:  # once per outage, not once per request
                logger.error("the workers' broker does not answer (503 to new jobs): %s", error)
            raise BrokerUnavailable(f"the workers' broker did not answer: {error}") from error
        with self._lock:
            if self._broker_down:
                self._broker_down = False
                logger.info("the workers' broker answers again")
            waiting += len(self._admitted)
            if waiting >= self.queue_size:
                self.refused += 1
                raise jobs.QueueFull(f"{waiting} jobs wait for a worker")
            self._admitted.add(job)
        job.relay.on_cancel(lambda reason: self._unadmit(job))

    def _unadmit(self, job):
        with self._lock:
            self._admitted.discard(job)

    def activate(self, job):
        message = job.message
        self._unadmit(job)
        if job.relay.cancelled is not None:
            return  # its web side ended first: never dispatched
        job.relay.on_cancel(lambda reason: self._cancel(job, reason))
        with self._lock:
            self._live[job.stream_id] = ""
            self.dispatched += 1
        try:
            self.broker.dispatch(message)
        except Exception:
            logger.exception("dispatching job %s to a worker failed", message["job"])
            self.forget(job)
            job.relay.finish(EndReason.ERROR)
            return
        threading.Thread(
            target=self._feed, args=(job,), name="streamguard-feeder", daemon=True
        ).start()

    def _cancel(self, job, reason):
        end = job.relay.end
        if end is not None and end is not EndReason.ERROR:
            return  # its worker ended it (its last item): nothing to cancel
        # The web side ended first, or the job failed here (a lost broker, a
        # failed dispatch, a worker that stopped beating), which its worker
        # may not know (a broker that hung for less than the worker's own
        # call's timeout).  Sent from a thread of its own: this runs where
        # the web side's stream ends (a waitress thread, or the hub's, which
        # serves every parked stream), and a broker that hangs holds a call
        # BROKER_TIMEOUT s.
        threading.Thread(
            target=self._send_cancel,
            args=(job.message["job"], reason),
            name="streamguard-cancel",
            daemon=True,
        ).start()

    def _send_cancel(self, job_id, reason):
        try:
            self.broker.cancel(job_id, reason)
        except Exception as error:
            if _lost_broker(error):
                # Its worker cancels it all the same: when it loses the
                # broker too, or when this side's lease expires (LEASE).
                logger.warning("job %s: lost the broker; not cancelled through it", job_id)
            else:
                logger.exception("cancelling job %s failed", job_id)

    def withdraw(self, job):
        # Never queued here before it was dispatched; a dispatched job is
        # cancelled through the broker (``_cancel``).
        return False

    def forget(self, job):
        with self._lock:
            self._live.pop(job.stream_id, None)
            self._positions.pop(job.stream_id, None)

    def place_of(self, stream_id):
        """``("worker NAME", 0)`` while a worker runs the job of the stream,
        ``("worker queue", position)`` while it waits in huey's queue (its
        place there, across the cluster, as its feeder last looked: once a
        second; 0 before its first look), None when it is not ours."""
        with self._lock:
            if stream_id not in self._live:
                return None
            worker = self._live[stream_id]
            position = self._positions.get(stream_id, 0)
        return (f"worker {worker}", 0) if worker else ("worker queue", position)

    def _feed(self, job):
        # The web process' thread of one job: the worker's chunks into the
        # relay (which blocks while the client's queue is full), the lease
        # renewed, the worker's heartbeat watched.
        job_id, relay, broker = job.message["job"], job.relay, self.broker
        started = False
        renewed = time.monotonic()

        def stopping():
            return relay.cancelled is not None

        try:
            while relay.cancelled is None:
                now = time.monotonic()
                if now - renewed >= LEASE / 5:
                    broker.renew_lease(job_id)
                    renewed = now
                item = broker.take(job_id)
                if item is None and not started:
                    # Still queued after POLL: the client learns its place
                    # as the pool tells it (``Job.moved``: once per move),
                    # and ``place_of`` (the status page) too.
                    position = broker.position(job_id)
                    with self._lock:
                        self._positions[job.stream_id] = position
                    job.moved(position)
                    continue
                if item is None:
                    if not broker.worker_alive(job_id):
                        logger.error("job %s: its worker stopped beating; the stream fails", job_id)
                        relay.finish(EndReason.ERROR)
                        return
                    continue
                kind, data = item
                if kind == b"c":
                    relay.put(data, stopping)
                    broker.taken(job_id, len(data))
                elif kind == b"s":
                    started = True
                    job.moved(0)  # "started", if it was told it waited
                    with self._lock:
                        self.started += 1
                        self._positions.pop(job.stream_id, None)
                        if job.stream_id in self._live:
                            self._live[job.stream_id] = data.decode()
                elif kind == b"e":
                    try:
                        reason = EndReason(data.decode())
                    except ValueError:
                        reason = EndReason.ERROR
                    relay.finish(reason)
                    return
        except Exception as error:
            if _lost_broker(error):
                # Not a bug here: one line, no traceback.
                logger.error("job %s: lost the broker (%s); the stream fails", job_id, error)
            else:
                logger.exception("feeding job %s from the broker failed", job_id)
            relay.finish(EndReason.ERROR)
        finally:
            self.forget(job)

    def workers_up(self):
        """The names of the workers up now (``Broker.workers_up``), or None
        when the broker does not answer."""
        try:
            return self.broker.workers_up()
        except Exception:
            return None

    def broker_view(self):
        """``(queued, up)``: the jobs waiting in the broker's queue (every
        instance's: ``Broker.queued``) and the names of the workers up now;
        ``(None, None)`` when the broker does not answer (within
        ``BROKER_TIMEOUT``: asked once, not once per figure)."""
        try:
            return self.broker.queued(), self.broker.workers_up()
        except Exception:
            return None, None

    def snapshot(self):
        with self._lock:
            return {
                "live": len(self._live),
                "dispatched": self.dispatched,
                "started": self.started,
                "queue_size": self.queue_size,
                "admitted": len(self._admitted),
                "refused": self.refused,
            }


def _lost_broker(error):
    """Whether ``error`` says Redis went away (or stopped answering)."""
    import redis

    return isinstance(error, (redis.ConnectionError, redis.TimeoutError))


def new_job_id():
    return uuid.uuid4().hex


def run_job(broker, message, stream_for, worker="worker"):
    """Worker side: run the job of ``message`` to its end.

    ``stream_for(message, relay)`` builds the job's ``GuardedStream``
    (Zope glue: its ZODB session, user, site); the producer's chunks go
    out through a local ``jobs.Relay`` that a pump thread empties into
    Redis, with the broker's backpressure.  The cancel key and the web
    side's lease are watched; so the producer stops at its next chunk or
    wait (``RelayConnection``)."""
    job_id = message["job"]
    wake = threading.Event()
    relay = jobs.Relay(wake.set)
    broker.beat(job_id, worker)
    reason = broker.wait_for_lease(job_id)
    if reason is not None:
        # Its web side ended (or died, or never learned it was queued)
        # while it waited in the queue.
        logger.info("job %s: its web side ended before it started (%s)", job_id, reason.value)
        broker.push(job_id, b"e", reason.value.encode())
        broker.end_beat(job_id)
        return
    try:
        stream = stream_for(message, relay)
    except Exception:
        logger.exception("job %s could not be set up", job_id)
        broker.push(job_id, b"e", EndReason.ERROR.value.encode())
        broker.end_beat(job_id)
        return
    # The broker's id of the job, for the producer's logs.
    stream.guard.job_id = job_id
    job = jobs.Job(stream, relay, label=message.get("label", ""))
    try:
        broker.push(job_id, b"s", worker.encode())
    except Exception:
        # The broker went between taking the job and starting it: the
        # producer never runs (its stream ends without a step).
        logger.exception("job %s: lost the broker before it started; not run", job_id)
        relay.cancel(EndReason.ERROR)
        stream.close()
        return
    pump = threading.Thread(
        target=_pump, args=(broker, job_id, relay, wake, worker), name="streamguard-pump"
    )
    pump.start()
    try:
        job.run()
    finally:
        wake.set()
        pump.join()
        try:
            broker.end_beat(job_id)
        except Exception as error:
            # Lost with the broker anyway (its key expires with LEASE).
            logger.warning("job %s: could not drop its heartbeat: %s", job_id, error)


def _pump(broker, job_id, relay, wake, worker):
    # The producer's chunks from the local relay to Redis; the web side's
    # cancel and lease to the relay; the heartbeat.  A lost broker (any
    # error from Redis) cancels the job: its producer stops at its next
    # chunk or wait, as if its client had left, but with ERROR (its
    # transaction aborted, its cleanups once); nothing more goes out.
    try:
        _pump_to_broker(broker, job_id, relay, wake, worker)
    except Exception as error:
        logger.error("job %s: lost the broker (%s); the job is cancelled", job_id, error)
        relay.cancel(EndReason.ERROR)
        while relay.take()[1] is None:
            # Until the job has ended (``finish`` wakes us): run_job joins us.
            wake.wait(POLL)
            wake.clear()


def _pump_to_broker(broker, job_id, relay, wake, worker):
    beaten = time.monotonic()
    while True:
        wake.wait(POLL)
        wake.clear()
        now = time.monotonic()
        if now - beaten >= LEASE / 5:
            broker.beat(job_id, worker)
            beaten = now
        if relay.cancelled is None:
            reason = broker.cancelled(job_id)
            if reason is not None:
                relay.cancel(reason)
        chunks, end = relay.take()
        for chunk in chunks:
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8")
            while relay.cancelled is None and broker.pending(job_id) > jobs.RELAY_HIGH:
                broker.wait_ack(job_id)
                reason = broker.cancelled(job_id)
                if reason is not None:
                    relay.cancel(reason)
                broker.beat(job_id, worker)
            if relay.cancelled is not None:
                break
            broker.push(job_id, b"c", chunk)
        if end is not None:
            broker.push(job_id, b"e", end.value.encode())
            return
