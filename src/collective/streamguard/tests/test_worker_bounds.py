"""Bounds of worker jobs: the workers' queue, and a broker that goes away.

Everything real, on loopback, as in ``test_workers``: runzeo, Debian's
``redis-server`` (with ``requirepass``), a runwsgi web instance whose
zope.conf sets ``worker-queue-size 1``, and a ``streamguard-worker``.  A
layer of its own: its tests kill and restart the Redis server, or freeze it
(SIGSTOP: a broker that stops answering without closing its connections)
and let it go on (SIGCONT), and no other module's tests use its Redis.
"""

import json
import os
import signal
import socket
import threading
import types

import redis

from collective.streamguard import jobs
from collective.streamguard import streaming
from collective.streamguard import workers
from collective.streamguard.streams import EndReason
from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.test_workers import ERROR_EVENT
from collective.streamguard.tests.test_workers import MANAGER
from collective.streamguard.tests.test_workers import WorkersLayer
from collective.streamguard.tests.workerstack import WorkerStackTestCase

#: The web instance's bound: one job may wait for the worker.
QUEUE_SIZE = 1


class WorkerBoundsLayer(WorkersLayer):
    """The workers' layer with ``worker-queue-size 1`` on the web instance,
    and a Redis server that tests may kill (``kill_redis``) and start again
    on the same port (``start_redis``)."""

    __module__ = __name__
    __name__ = "WORKER_BOUNDS"

    def configure(self, home):
        # The layer's product config, with the bound added to it.
        super().configure(home)
        with open(home.zope_conf) as f:
            head, end, tail = f.read().rpartition("</product-config>")
        with open(home.zope_conf, "w") as f:
            f.write(f"{head}  worker-queue-size {QUEUE_SIZE}\n{end}{tail}")

    def kill_redis(self):
        os.kill(self.redis_process.pid, signal.SIGKILL)
        self.redis_process.wait(10)

    def freeze_redis(self):
        """Stop Redis (SIGSTOP): its connections stay open and the kernel
        still accepts new ones, but nothing answers (a hung broker or host,
        not a refused connection).  ``thaw_redis`` lets it go on."""
        os.kill(self.redis_process.pid, signal.SIGSTOP)

    def thaw_redis(self):
        os.kill(self.redis_process.pid, signal.SIGCONT)


WORKER_BOUNDS = WorkerBoundsLayer()
QUEUE = "huey.redis." + workers.QUEUE_NAME


class TestWorkerBounds(WorkerStackTestCase):
    layer = WORKER_BOUNDS

    def stream(self, query, auth=None):
        sock = HTTPClient((HOST, self.layer.web.port), timeout=30)
        self.addCleanup(sock.close)
        return sock.request(f"/@@streamguard-test-worker?{query}", auth=auth)

    def request(self, query, auth=None):
        return http_request(
            (HOST, self.layer.web.port), f"/@@streamguard-test-worker?{query}", auth=auth
        )

    def status(self):
        status, _, body = http_request(
            (HOST, self.layer.web.port), "/@@stream-status?format=json", auth=MANAGER
        )
        self.assertEqual(status, 200, body)
        return json.loads(body)

    def assert_refused(self, answer, message):
        status, headers, body = answer
        self.assertEqual(status, 503, body)
        self.assertEqual(body.decode(), message)
        self.assertTrue(headers["content-type"].startswith("text/plain"), headers)
        retry = int(headers["retry-after"])
        self.assertTrue(10 <= retry <= 20, retry)

    def test_past_the_workers_queue_a_job_gets_503_with_retry_after(self):
        busy = self.stream("tag=qb-busy&mode=batch&count=40&hold=0&run_on=worker", auth=MANAGER)
        busy.read_until(b"created 0\n", 60)
        waiting = self.stream("tag=qb-waiting&mode=sees&run_on=worker", auth=MANAGER)
        waiting.head(30)
        self.assertTrue(wait_for(lambda: self.redis.llen(QUEUE) == QUEUE_SIZE, 30))
        # One waits: the next is refused, before its first byte, and never runs.
        self.assert_refused(
            self.request("tag=qb-refused&mode=csv&count=1&run_on=worker"),
            streaming.WORKER_QUEUE_FULL,
        )
        self.assert_refused(
            self.request(
                "tag=qb-refused-sse&mode=csv&count=1&run_on=worker&type=text/event-stream"
            ),
            streaming.WORKER_QUEUE_FULL,
        )
        answer = self.status()
        self.assertEqual(answer["workers"]["queue_size"], QUEUE_SIZE)
        self.assertGreaterEqual(answer["workers"]["refused"], 2)
        # The worker frees: the waiting job runs, and the queue has room again.
        busy.close()
        self.assertEqual(waiting.body(60), b"qb-waiting\n")
        self.assertEqual(
            self.stream("tag=qb-after&mode=sees&run_on=worker").body(30), b"qb-after\n"
        )
        self.assertEqual(self.events("start", tag="qb-refused"), [])
        self.assertEqual(self.events("start", tag="qb-refused-sse"), [])

    def batch_held_at_14(self, tag):
        """An SSE client of a worker's batch job ``tag`` that waits after
        document 14 (10 committed), once its step 14 is recorded."""
        sock = self.stream(
            f"tag={tag}&mode=batch&count=40&hold=14&run_on=worker&type=text/event-stream"
        )
        sock.read_until(b"created 14\n", 60)
        self.assertTrue(wait_for(lambda: self.events("step", tag=tag, n=14), 30))
        return sock

    def worker_said(self, text):
        return self.worker_output().count(text)

    def test_broker_frozen_mid_job_fails_the_stream_cancels_the_producer_and_the_worker_goes_on(
        self,
    ):
        sock = self.batch_held_at_14("frozen")
        worker = self.layer.worker
        lost, back = self.worker_said("lost the broker ("), self.worker_said("answers again")
        logged = len(self.worker_output())
        self.layer.freeze_redis()
        # Whatever fails below, Redis goes on: the next tests need it.
        self.addCleanup(self.layer.thaw_redis)
        try:
            # No read fails at once (the connections stay open): each call
            # to Redis gives up after BROKER_TIMEOUT, and the client is told
            # in the stream's format.
            sock.read_until(ERROR_EVENT, 60)
            self.assertEqual(sock.read_all(60), b"\r\n")
            # The worker's producer is cancelled: its finally, its cleanups
            # once, with "error"; no step after the one it waited in.
            self.assertTrue(wait_for(lambda: self.events("cleanup", tag="frozen"), 60))
            self.assert_batch_stopped_at_14("frozen", "error", worker.pid)
            # While the broker hangs, a worker job is refused plainly, and
            # the status page answers without the broker's figures.
            self.assert_refused(
                self.request("tag=frozen-down&mode=sees&run_on=worker"),
                streaming.WORKERS_UNAVAILABLE,
            )
            answer = self.status()["workers"]
            self.assertEqual((answer["up"], answer["queued"]), (None, None))
            # The worker's consumer has noticed too, while Redis hangs.
            self.assertTrue(
                wait_for(lambda: self.worker_said("lost the broker (") == lost + 2, 60),
                self.worker_output()[-3000:],
            )
        finally:
            self.layer.thaw_redis()
        # The same worker process takes jobs again.
        self.assertTrue(wait_for(lambda: self.worker_said("answers again") == back + 1, 60))
        self.assertEqual(
            self.stream("tag=frozen-after&mode=sees&run_on=worker").body(60), b"frozen-after\n"
        )
        self.assertIsNone(worker.poll())
        self.assertEqual(self.events("start", tag="frozen-after")[0]["pid"], worker.pid)
        self.assertEqual(self.events("start", tag="frozen-down"), [])
        # One line for the job, one for the queue, one when it is back; no
        # traceback (huey's scheduler would log one at every look).
        self.assertEqual(self.worker_said("lost the broker ("), lost + 2)
        self.assertNotIn("Traceback", self.worker_output()[logged:])
        # Nothing of the cancelled job after its last commit, now that Redis
        # has run whatever the frozen connections had sent.
        self.assertIsNone(self.stored("sg_frozen_10"))

    def broker(self):
        """The add-on's broker, as a web instance has it (same Redis, same
        secret): what its ``dispatch`` sends is a job the worker would run."""
        broker = workers.Broker(self.layer.broker_url, self.layer.secret)
        self.addCleanup(broker.redis.close)
        return broker

    @staticmethod
    def job(tag):
        # No ZODB session: the producer records its start, then fails on
        # guard.zodb; only whether it starts matters here.  The tag is the
        # job's own: the test may run again in the same layer (-N).
        job_id = workers.new_job_id()
        return {
            "job": job_id,
            "producer": "streamguard-test.sees",
            "args": {"tag": f"{tag}-{job_id}"},
            "session": None,
        }

    def test_a_job_whose_dispatch_timed_out_on_a_frozen_redis_never_runs(self):
        # A frozen Redis keeps what an open connection sent it, and runs it
        # when it goes on: the push of a dispatch that timed out (its client
        # was told it failed) reaches the worker then, without a lease.
        broker, message = self.broker(), self.job("late")
        broker.queued()  # its connection is open before Redis stops
        never_run = self.worker_said("never confirmed it was queued")
        self.layer.freeze_redis()
        self.addCleanup(self.layer.thaw_redis)
        try:
            with self.assertRaises(redis.exceptions.TimeoutError):
                broker.dispatch(message)
        finally:
            self.layer.thaw_redis()
        self.assertTrue(
            wait_for(
                lambda: self.worker_said("never confirmed it was queued") == never_run + 1, 60
            ),
            self.worker_output()[-3000:],
        )
        self.assertIn(message["job"], self.worker_output()[-3000:])
        self.assertEqual(self.events("start", tag=message["args"]["tag"]), [])
        # The worker takes jobs again.
        self.assertEqual(
            self.stream("tag=late-after&mode=sees&run_on=worker").body(60), b"late-after\n"
        )

    def test_a_job_taken_before_its_lease_is_set_waits_for_it_and_runs(self):
        # dispatch() queues first and sets the lease next: a worker may take
        # the job in between.
        broker, message = self.broker(), self.job("early")
        broker.task(message)
        beat = workers.Broker.key(message["job"], "beat")
        self.assertTrue(wait_for(lambda: self.redis.exists(beat), 30))
        tag = message["args"]["tag"]
        self.assertEqual(self.events("start", tag=tag), [])
        broker.renew_lease(message["job"])
        self.assertTrue(wait_for(lambda: self.events("start", tag=tag), 30))

    def test_a_cancel_on_a_frozen_redis_holds_no_thread_of_the_web_side(self):
        # Where a stream ends (a waitress worker, or the hub that serves every
        # parked stream) must not wait BROKER_TIMEOUT s for a hung Redis.
        dispatch = workers.WorkerDispatch(self.broker())
        dispatch.broker.queued()  # its connection is open before Redis stops
        job = types.SimpleNamespace(
            relay=jobs.Relay(lambda: None), message={"job": workers.new_job_id()}
        )
        self.layer.freeze_redis()
        self.addCleanup(self.layer.thaw_redis)
        try:
            dispatch._cancel(job, EndReason.CLIENT_GONE)
            # Returned while the cancel itself still waits for Redis.
            senders = [t for t in threading.enumerate() if t.name == "streamguard-cancel"]
            self.assertTrue(any(t.is_alive() for t in senders), senders)
        finally:
            self.layer.thaw_redis()
        for sender in senders:
            sender.join(30)
        # Redis went on: the cancel it had kept is there.
        self.assertEqual(
            self.redis.get(workers.Broker.key(job.message["job"], "cancel")),
            EndReason.CLIENT_GONE.value.encode(),
        )

    def test_broker_killed_mid_job_cancels_the_producer_and_the_worker_goes_on(self):
        sock = self.batch_held_at_14("lost")
        worker = self.layer.worker
        lost, back = self.worker_said("lost the broker ("), self.worker_said("answers again")
        self.layer.kill_redis()
        try:
            # The client is told in the stream's format (the web side's read
            # fails at once on a closed connection; BROKER_TIMEOUT if the
            # broker's host stops answering).
            sock.read_until(ERROR_EVENT, workers.BROKER_TIMEOUT + 10)
            self.assertEqual(sock.read_all(30), b"\r\n")
            # The worker's producer is cancelled: its finally, its cleanups
            # once, with "error"; no step after the one it waited in.
            bound = workers.POLL + workers.BROKER_TIMEOUT + 10
            self.assertTrue(wait_for(lambda: self.events("cleanup", tag="lost"), bound))
            self.assert_batch_stopped_at_14("lost", "error", worker.pid)
            # While the broker is away, a worker job is refused plainly.
            self.assert_refused(
                self.request("tag=lost-down&mode=sees&run_on=worker"),
                streaming.WORKERS_UNAVAILABLE,
            )
            # The status page still answers; it cannot say which workers are up.
            self.assertIsNone(self.status()["workers"]["up"])
            # The worker's consumer has noticed too (before Redis is back).
            self.assertTrue(
                wait_for(lambda: self.worker_said("lost the broker (") == lost + 2, 30),
                self.worker_output()[-3000:],
            )
        finally:
            self.layer.start_redis()
        # The same worker process takes jobs again.
        self.assertEqual(
            self.stream("tag=lost-after&mode=sees&run_on=worker").body(60), b"lost-after\n"
        )
        self.assertIsNone(worker.poll())
        self.assertEqual(self.events("start", tag="lost-after")[0]["pid"], worker.pid)
        self.assertEqual(self.events("start", tag="lost-down"), [])
        # One line for the job, one for the queue; one when it is back.
        self.assertEqual(
            self.worker_said("lost the broker ("), lost + 2, self.worker_output()[-3000:]
        )
        self.assertTrue(wait_for(lambda: self.worker_said("answers again") == back + 1, 30))
        # Still nothing of the cancelled job after its last commit.
        self.assertIsNone(self.stored("sg_lost_10"))

    def test_status_lists_the_workers_that_serve_the_broker(self):
        name = f"{socket.gethostname()}:{self.layer.worker.pid}"
        self.assertTrue(wait_for(lambda: name in (self.status()["workers"]["up"] or []), 30))
        self.assertEqual(self.status()["workers"]["up"], [name])
        self.assertTrue(self.redis.exists(workers.PRESENCE + name))
