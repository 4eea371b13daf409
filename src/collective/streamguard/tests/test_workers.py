"""Producers in worker processes (``stream_response(..., run_on="worker")``).

Everything real, on loopback (``workerstack.WorkersLayer``): a ZEO server,
Redis, a Zope web instance and a worker, both ZEO clients of the same
storage; the test process reads the database as a third ZEO client.  The
producers are the test views' (Zope only, so that the layer starts in
seconds); the README's own CSV export and batch job on a Plone site run
on a worker in ``test_plone_workers``.
"""

import json
import os
import re
import signal
import socket
import subprocess
import unittest

from collective.streamguard import deployment
from collective.streamguard import jobs
from collective.streamguard import workers
from collective.streamguard.testing import set_product_config
from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.servers import executable
from collective.streamguard.tests.servers import free_port
from collective.streamguard.tests.workerstack import MANAGER
from collective.streamguard.tests.workerstack import WorkersLayer
from collective.streamguard.tests.workerstack import WorkerStackTestCase
from collective.streamguard.tests.zopeinstance import ZopeInstance

ERROR_EVENT = b"event: error\ndata: the stream failed on the server\n\n"

WORKERS = WorkersLayer()


def huey_fields(message_id, args):
    """The fields of huey's ``Message`` for our task with ``args`` (what
    its serializer writes as a list): no eta, retries, priority or
    callbacks."""
    return [message_id, workers.TASK_NAME, None, 0, 0, None, args, {}] + [None] * 7


class TestWorkers(WorkerStackTestCase):
    layer = WORKERS

    def stream(self, query, instance=None, auth=None):
        instance = instance or self.layer.web
        sock = HTTPClient((HOST, instance.port), timeout=30)
        self.addCleanup(sock.close)
        return sock.request(f"/@@streamguard-test-worker?{query}", auth=auth)

    def worker_pid(self):
        return self.layer.worker.pid

    def test_csv_export_gives_the_same_bytes_on_a_worker_as_in_process(self):
        here = self.stream("tag=csv-here&mode=csv&count=5000").body(30)
        on_worker = self.stream("tag=csv-worker&mode=csv&count=5000&run_on=worker").body(30)
        on_pool = self.stream("tag=csv-pool&mode=csv&count=5000&run_on=pool").body(30)
        self.assertGreater(len(here), 64 * 1024)  # more than one chunk
        self.assertEqual(on_worker, here)
        self.assertEqual(on_pool, here)
        # And it ran in the worker, the others in the web process.
        self.assertEqual(self.events("start", tag="csv-worker")[0]["pid"], self.worker_pid())
        self.assertEqual(self.events("start", tag="csv-here")[0]["pid"], self.layer.web_process.pid)

    def test_batch_job_commits_in_the_worker_and_finishes(self):
        sock = self.stream("tag=done&mode=batch&count=25&run_on=worker")
        body = sock.body(60)
        self.assertEqual(body, b"".join(b"created %d\n" % n for n in range(25)))
        [start] = self.events("start", tag="done")
        self.assertEqual(start["pid"], self.worker_pid())
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="done"), 30))
        self.assertEqual(self.events("cleanup", tag="done")[0]["reason"], "finished")
        self.assertEqual(self.stored("sg_done_24"), 24)

    def test_client_leaving_stops_the_job_and_aborts_since_the_last_commit(self):
        sock = self.stream("tag=left&mode=batch&count=40&hold=14&run_on=worker")
        sock.read_until(b"created 14\n", 60)
        sock.close()
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="left"), 30))
        self.assert_batch_stopped_at_14("left", "client gone", self.worker_pid())
        # The worker is free: the next job runs.
        self.assertEqual(
            self.stream("tag=after-left&mode=sees&run_on=worker").body(30), b"after-left\n"
        )

    def test_job_sees_what_its_request_wrote(self):
        body = self.stream("tag=seen-mark&mode=sees&run_on=worker").body(30)
        self.assertEqual(body, b"seen-mark\n")
        self.assertEqual(self.events("start", tag="seen-mark")[0]["pid"], self.worker_pid())

    def test_job_that_raises_fails_the_stream_and_aborts(self):
        sock = self.stream("tag=raised&mode=error&run_on=worker&type=text/event-stream")
        # A failed stream's body ends with the error event, and the server
        # closes the connection (no terminating chunk: the body is broken).
        sock.read_until(b"one line", 30)
        sock.read_until(ERROR_EVENT, 30)
        self.assertEqual(sock.read_all(30), b"\r\n")
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="raised"), 30))
        self.assertEqual(self.events("cleanup", tag="raised")[0]["reason"], "error")
        self.assertIsNone(self.stored("sg_raised_error"))
        self.assertEqual(self.worker_output().count("ValueError: the job failed on purpose"), 1)
        # The worker is back.
        self.assertEqual(
            self.stream("tag=after-error&mode=sees&run_on=worker").body(30), b"after-error\n"
        )

    def test_the_worker_runs_at_zope_confs_niceness_in_every_thread(self):
        # The layer's worker zope.conf does not set worker-nice: the default.
        pid = self.worker_pid()
        threads = os.listdir(f"/proc/{pid}/task")
        self.assertGreater(len(threads), 1)  # ZEO's client thread, at least
        for tid in threads:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # After "(command)": the state is field 3, the niceness 19.
                fields = f.read().rpartition(")")[2].split()
            self.assertEqual(int(fields[19 - 3]), workers.DEFAULT_NICE, tid)
        self.assertIn(f"(nice {workers.DEFAULT_NICE})", self.layer.worker_output())

    def test_unsigned_and_badly_signed_messages_are_refused_never_run(self):
        message = {
            "job": workers.new_job_id(),
            "producer": "streamguard-test.batch",
            "args": {"tag": "forged", "count": 1},
            "session": None,
        }
        huey_message = huey_fields(workers.new_job_id(), [message])
        payload = json.dumps({"huey-message": huey_message}).encode()
        queue = "huey.redis." + workers.QUEUE_NAME
        self.redis.lpush(queue, payload)  # unsigned
        self.redis.lpush(queue, workers.sign("not the secret", payload))  # badly signed
        # A signed job after them runs: the worker has read both before.
        self.assertEqual(
            self.stream("tag=after-forged&mode=sees&run_on=worker").body(30), b"after-forged\n"
        )
        self.assertEqual(self.events("start", tag="forged"), [])
        self.assertEqual(self.worker_output().count("refused a broker message"), 2)

    def test_worker_killed_mid_job_fails_the_stream_and_commits_nothing_more(self):
        sock = self.stream(
            "tag=killed&mode=batch&count=40&hold=14&run_on=worker&type=text/event-stream"
        )
        sock.read_until(b"created 14\n", 60)
        self.assertTrue(wait_for(lambda: self.events("step", tag="killed", n=14), 30))
        worker = self.layer.worker
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        try:
            # Within the heartbeat's bound (workers.LEASE + POLL seconds).
            sock.read_until(ERROR_EVENT, workers.LEASE + 20)
            self.assertEqual(sock.read_all(30), b"\r\n")
            self.assertEqual(self.stored("sg_killed_9"), 9)
            self.assertIsNone(self.stored("sg_killed_10"))
            self.assertEqual(self.events("cleanup", tag="killed"), [])  # it died
        finally:
            self.layer.worker = self.layer.start_worker()
        # Not run again by the new worker.
        self.assertEqual(
            self.stream("tag=after-kill&mode=sees&run_on=worker").body(30), b"after-kill\n"
        )
        self.assertEqual(len(self.events("start", tag="killed")), 1)

    def test_web_instance_killed_mid_job_cancels_the_job(self):
        web, process = self.layer.start_web()
        sock = self.stream("tag=orphan&mode=batch&count=40&hold=14&run_on=worker", web)
        sock.read_until(b"created 14\n", 60)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        # Its lease expires: the worker cancels within LEASE + POLL seconds.
        # (The worker's producers report to the first instance's file.)
        found = wait_for(lambda: self.events("cleanup", tag="orphan"), workers.LEASE + 20)
        self.assertTrue(found)
        [cleanup] = self.events("cleanup", tag="orphan")
        self.assertEqual(cleanup["reason"], "client gone")
        self.assertEqual(self.stored("sg_orphan_9"), 9)
        self.assertIsNone(self.stored("sg_orphan_10"))

    def test_job_runs_as_the_user_who_asked_with_their_permissions(self):
        body = self.stream("tag=as-manager&mode=whoami&run_on=worker", auth=MANAGER).body(30)
        self.assertEqual(body, b"manager\n")
        [seen] = self.events("whoami", tag="as-manager")
        self.assertEqual((seen["user"], seen["manage"]), ("manager", True))
        self.assertEqual(self.events("start", tag="as-manager")[0]["pid"], self.worker_pid())
        self.stream("tag=as-anonymous&mode=whoami&run_on=worker").body(30)
        [seen] = self.events("whoami", tag="as-anonymous")
        self.assertEqual(seen["manage"], False)
        self.assertNotEqual(seen["user"], "manager")

    def test_status_shows_the_worker_that_runs_a_stream(self):
        sock = self.stream("tag=shown&mode=batch&count=40&hold=3&run_on=worker", auth=MANAGER)
        sock.read_until(b"created 3\n", 60)
        status, _, body = http_request(
            (HOST, self.layer.web.port), "/@@stream-status?format=json", auth=MANAGER
        )
        self.assertEqual(status, 200, body)
        answer = json.loads(body)
        [live] = [s for s in answer["live"] if "streamguard-test-worker" in s["label"]]
        self.assertTrue(live["runs"].startswith("worker "), live)
        self.assertIn(str(self.worker_pid()), live["runs"])
        self.assertEqual(answer["places"]["worker"], 1)
        self.assertGreaterEqual(answer["workers"]["started"], 1)
        sock.close()
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="shown"), 30))

    def status_page(self):
        address = (HOST, self.layer.web.port)
        status, _, body = http_request(address, "/@@stream-status", auth=MANAGER)
        self.assertEqual(status, 200, body)
        return body.decode()

    def test_status_page_shows_the_workers_and_where_each_stream_runs(self):
        name = f"{socket.gethostname()}:{self.worker_pid()}"
        busy = self.stream("tag=page-busy&mode=batch&count=40&hold=0&run_on=worker", auth=MANAGER)
        busy.read_until(b"created 0\n", 60)
        queued = self.stream("tag=page-queued&mode=sees&run_on=worker")
        queued.head(30)

        def placed():
            status, _, body = http_request(
                (HOST, self.layer.web.port), "/@@stream-status?format=json", auth=MANAGER
            )
            places = {(s["runs"], s["position"]) for s in json.loads(body)["live"]}
            return {(f"worker {name}", 0), ("worker queue", 1)} <= places

        # The queued job's feeder looks its place up once a second.
        self.assertTrue(wait_for(placed, 60))
        # A worker's name comes from Redis: whoever can write it chooses it.
        forged = "<b>forged</b>&"
        self.redis.set(workers.PRESENCE + forged, "{}", ex=workers.LEASE)
        self.addCleanup(self.redis.delete, workers.PRESENCE + forged)
        page = self.status_page()
        self.assertIn(f"worker {name}</td>", page)
        self.assertIn("worker queue (position 1)</td>", page)
        self.assertRegex(page, r"<th>Broker</th>\s*<td>configured, answers</td>")
        self.assertIn(f'<span class="streamguard-worker">{name}</span>', page)
        escaped = "&lt;b&gt;forged&lt;/b&gt;&amp;"
        self.assertIn(f'<span class="streamguard-worker">{escaped}</span>', page)
        self.assertNotIn("<b>forged", page)
        for label, value in (
            (r"Jobs queued on the broker \(all instances\)", 1),
            (r"Worker queue bound \(worker-queue-size\)", workers.DEFAULT_QUEUE_SIZE),
            ("Live here on workers", 2),
        ):
            self.assertRegex(page, rf"<th>{label}</th>\s*<td>{value}</td>")
        self.assertTrue(re.search(r"<th>worker</th>\s*<td>2</td>", page), page)
        self.assertNotIn("No broker is configured", page)
        busy.close()
        self.assertEqual(queued.body(60), b"page-queued\n")
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="page-busy"), 30))

    def made(self, tag):
        return max([e["made"] for e in self.events("made", tag=tag)] or [0])

    def test_a_client_that_does_not_read_holds_the_worker_back(self):
        sock = self.stream("tag=flood&mode=flood&run_on=worker")
        sock.head(30)
        self.assertTrue(wait_for(lambda: self.events("job", tag="flood"), 30))
        job_id = self.events("job", tag="flood")[0]["job_id"]
        self.assertTrue(job_id)
        pending_key = workers.Broker.key(job_id, "pending")
        bound = jobs.RELAY_HIGH + (64 << 10)
        samples = []

        def full():
            samples.append(int(self.redis.get(pending_key) or 0))
            return samples[-1] > jobs.RELAY_HIGH

        # The client reads nothing: the output waiting in Redis reaches the
        # bound, and never goes past it.
        self.assertTrue(wait_for(full, 60))
        self.assertLessEqual(max(samples), bound)
        for _ in range(50):
            self.assertLessEqual(int(self.redis.get(pending_key) or 0), bound)
        # The client reads: the job goes on.
        made = self.made("flood")
        sock.read_exactly(8 << 20, 60)
        self.assertTrue(wait_for(lambda: self.made("flood") > made, 30))
        sock.close()
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="flood"), 30))
        self.assertEqual(self.events("cleanup", tag="flood")[0]["reason"], "client gone")

    def test_a_job_whose_client_left_while_it_was_queued_never_starts(self):
        busy = self.stream("tag=busy&mode=batch&count=40&hold=0&run_on=worker", auth=MANAGER)
        busy.read_until(b"created 0\n", 60)
        queue = "huey.redis." + workers.QUEUE_NAME
        queued = self.stream("tag=left-queued&mode=sees&run_on=worker", auth=MANAGER)
        queued.head(30)
        self.assertTrue(wait_for(lambda: self.redis.llen(queue) == 1, 30))
        queued.close()

        def gone():
            status, _, body = http_request(
                (HOST, self.layer.web.port), "/@@stream-status?format=json", auth=MANAGER
            )
            return not [s for s in json.loads(body)["live"] if "left-queued" in s["label"]]

        self.assertTrue(wait_for(gone, 30))
        busy.close()
        self.assertTrue(wait_for(lambda: self.events("cleanup", tag="busy"), 30))
        # The worker takes the queued job, sees that its web side ended, and
        # goes on to the next one.
        body = self.stream("tag=after-queued&mode=sees&run_on=worker").body(30)
        self.assertEqual(body, b"after-queued\n")
        self.assertEqual(self.events("start", tag="left-queued"), [])

    def test_queued_jobs_are_told_their_place_and_when_they_start(self):
        busy = self.stream("tag=hog&mode=batch&count=40&hold=0&run_on=worker", auth=MANAGER)
        busy.read_until(b"created 0\n", 60)
        text = self.stream(
            "tag=wait-text&mode=batch&count=1&run_on=worker&type=text/plain", auth=MANAGER
        )
        text.read_until(b"queued: position 1\n", 30)
        # (A user has at most 2 live streams: this one is anonymous.)
        events = self.stream("tag=wait-sse&mode=batch&count=1&run_on=worker&type=text/event-stream")
        second = b'event: queued\ndata: {"position": 2}\n\n'
        first = b'event: queued\ndata: {"position": 1}\n\n'
        started = b"event: started\ndata: {}\n\ncreated 0\n"
        events.read_until(second, 30)
        busy.close()
        self.assertEqual(text.body(60), b"queued: position 1\ncreated 0\n")
        body = events.body(60)
        # Position 1 is told if the feeder looked while it was there.
        self.assertIn(body, (second + started, second + first + started))


class TestMessages(unittest.TestCase):
    """Signing and the producer registry, without a broker."""

    def test_a_signed_payload_verifies_only_with_its_secret(self):
        signed = workers.sign("s3cret", b'{"job": "1"}')
        self.assertEqual(workers.verify("s3cret", signed), b'{"job": "1"}')
        with self.assertRaises(workers.BadSignature):
            workers.verify("other", signed)
        with self.assertRaises(workers.BadSignature):
            workers.verify("s3cret", b'{"job": "1"}')  # unsigned
        forged = signed.replace(b'"1"', b'"2"')
        with self.assertRaises(workers.BadSignature):
            workers.verify("s3cret", forged)
        with self.assertRaises(ValueError):
            workers.sign("", b"x")  # no secret configured

    def test_the_serializer_writes_signed_json_and_refuses_anything_else(self):
        import pickle

        from huey.registry import Message

        serializer_class, _ = workers.broker_classes()
        serializer = serializer_class("s3cret")
        message = Message(*huey_fields("id", ({"job": "j"},)))
        data = serializer.serialize(message)
        self.assertTrue(json.loads(workers.verify("s3cret", data)))  # JSON, not pickle
        self.assertEqual(serializer.deserialize(data).args, [{"job": "j"}])
        with self.assertRaises(workers.BadSignature):
            serializer.deserialize(pickle.dumps(message))
        with self.assertRaises(workers.BadSignature):
            serializer_class("other").deserialize(data)

    def test_only_registered_producers_have_a_name(self):
        @workers.register_producer("streamguard-test.unit")
        def registered(guard):
            yield "x"

        self.addCleanup(workers.PRODUCERS.pop, "streamguard-test.unit")
        self.assertEqual(workers.producer_name(registered), "streamguard-test.unit")

        def unregistered(guard):
            yield "x"

        with self.assertRaises(TypeError):
            workers.producer_name(unregistered)
        with self.assertRaises(ValueError):
            workers.register_producer("streamguard-test.unit")(unregistered)


class TestWorkerSettings(unittest.TestCase):
    def test_worker_nice_is_zope_confs_between_0_and_19_else_the_default(self):
        for setting, nice in (
            (None, workers.DEFAULT_NICE),
            ("0", 0),
            (" 5 ", 5),
            ("19", 19),
            ("40", 19),
            ("-3", 0),
            ("high", workers.DEFAULT_NICE),
        ):
            with self.subTest(setting=setting):
                set_product_config(self, **{"worker-nice": setting})
                self.assertEqual(deployment.worker_nice(), nice)


class TestWorkerCommand(unittest.TestCase):
    def test_a_zope_conf_without_broker_or_secret_gets_a_clear_answer(self):
        home = ZopeInstance(free_port())
        self.addCleanup(home.remove)
        result = subprocess.run(
            [executable("streamguard-worker"), home.zope_conf],
            env={**os.environ, **home.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("needs worker-broker and worker-secret", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_a_missing_zope_conf_gets_a_clear_answer(self):
        result = subprocess.run(
            [executable("streamguard-worker"), "/nonexistent/zope.conf"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("no such file: /nonexistent/zope.conf", result.stderr)
