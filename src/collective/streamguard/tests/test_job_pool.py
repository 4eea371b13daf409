"""Busy producers on the job pool (``stream_response(run_on="pool")``), over
real sockets on the 4-thread waitress of the test layer."""

import json
import re
import sys
import threading
import unittest

from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD
from plone.app.testing import TEST_USER_ID
from plone.app.testing import TEST_USER_NAME
from plone.app.testing import TEST_USER_PASSWORD

from collective.streamguard import jobs
from collective.streamguard.streams import EndReason
from collective.streamguard.testing import TEST_VIEWS_WAITRESS_TESTING
from collective.streamguard.testing import committed_site
from collective.streamguard.testing import open_stream
from collective.streamguard.testing import set_product_config
from collective.streamguard.testing import wait_for_streams_to_end
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import AllLogLines
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import wait_for

OWNER = (SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
POOL = "/plone/@@streamguard-test-pool"


def jobs_done():
    """True once no job of the pool is live (their cleanups ran)."""
    return wait_for(lambda: not jobs.job_streams.live())


def job_blocked_in_put():
    """True while a job thread waits in ``Relay.put`` (backpressure)."""
    for thread in threading.enumerate():
        if thread.name.startswith("streamguard-jobs"):
            frame = sys._current_frames().get(thread.ident)
            while frame is not None:
                if frame.f_code is jobs.Relay.put.__code__:
                    return True
                frame = frame.f_back
    return False


class TestRelay(unittest.TestCase):
    """The relay between a job and its web side, without a server."""

    def test_put_waits_above_the_high_water_mark_until_the_web_side_takes(self):
        woken = threading.Event()
        relay = jobs.Relay(woken.set, high=10)
        self.assertTrue(relay.put(b"12345"))
        self.assertTrue(woken.is_set())
        returned = threading.Event()

        def job():
            relay.put(b"1234567890")
            returned.set()

        thread = threading.Thread(target=job)
        thread.start()
        self.assertTrue(wait_for(lambda: relay.size == 15))
        self.assertFalse(returned.is_set())  # above 10 bytes: it waits
        chunks, end = relay.take()
        thread.join(10)
        self.assertTrue(returned.is_set())
        self.assertEqual(chunks, [b"12345", b"1234567890"])
        self.assertIsNone(end)
        relay.finish(EndReason.FINISHED)
        self.assertEqual(relay.take(), ([], EndReason.FINISHED))

    def test_cancel_ends_a_waiting_put_and_runs_the_callbacks_once(self):
        relay = jobs.Relay(lambda: None, high=1)
        reasons = []
        relay.on_cancel(reasons.append)
        result = []
        thread = threading.Thread(target=lambda: result.append(relay.put(b"xx")))
        thread.start()
        self.assertTrue(wait_for(lambda: relay.size == 2))
        relay.cancel(EndReason.CLIENT_GONE)
        relay.cancel(EndReason.TIMEOUT)
        thread.join(10)
        self.assertEqual(result, [False])
        self.assertEqual(reasons, [EndReason.CLIENT_GONE])
        self.assertFalse(relay.put(b"more"))


class FakeJob(jobs.Job):
    """A job whose run() waits for the test: the pool's bookkeeping only
    (a stand-in for a producer, which the functional tests below run)."""

    def __init__(self, name):
        super().__init__(None, jobs.Relay(lambda: None), notice=self.note, label=name)
        self.notes = []
        self.release = threading.Event()
        self.ran = threading.Event()

    def note(self, position, first):
        self.notes.append(position)

    def run(self):
        self.ran.set()
        self.release.wait(10)


class TestJobPool(unittest.TestCase):
    def test_two_run_the_rest_wait_in_order_and_move_up(self):
        pool = jobs.JobPool(size=2, queue_size=3, name="test")
        made = [FakeJob(f"job {n}") for n in range(5)]
        self.addCleanup(lambda: [job.release.set() for job in made])
        places = [pool.admit(job) for job in made]
        self.assertEqual(places, [0, 0, 1, 2, 3])
        with self.assertRaises(jobs.QueueFull):
            pool.admit(FakeJob("one too many"))
        for job in made:
            pool.activate(job)
        self.assertTrue(made[0].ran.wait(10) and made[1].ran.wait(10))
        self.assertFalse(made[2].ran.is_set())
        # The last one leaves the queue: it never runs, nobody moves.
        made[4].relay.cancel(EndReason.CLIENT_GONE)
        self.assertEqual(pool.snapshot()["withdrawn"], 1)
        made[0].release.set()
        self.assertTrue(made[2].ran.wait(10))
        self.assertTrue(wait_for(lambda: made[3].notes[-1:] == [1]))
        self.assertEqual(made[2].notes, [1, 0])  # queued at 1, then started
        for job in made[1:4]:
            job.release.set()
        self.assertTrue(made[3].ran.wait(10))
        self.assertTrue(wait_for(lambda: pool.snapshot()["running"] == 0))
        self.assertFalse(made[4].ran.is_set())
        self.assertEqual(made[4].state, jobs.WITHDRAWN)
        self.assertTrue(wait_for(lambda: pool.threads == 0))  # idle threads go

    def test_the_switch_interval_is_short_while_jobs_run_and_comes_back_after(self):
        before = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, before)
        pool = jobs.JobPool(size=2, queue_size=0, name="test")
        pool.configure(2, 0, 0.0002)
        made = [FakeJob(f"job {n}") for n in range(2)]
        self.addCleanup(lambda: [job.release.set() for job in made])
        for job in made:
            pool.admit(job)
            pool.activate(job)
        self.assertTrue(made[0].ran.wait(10) and made[1].ran.wait(10))
        self.assertAlmostEqual(sys.getswitchinterval(), 0.0002, places=6)
        made[0].release.set()
        self.assertTrue(wait_for(lambda: pool.snapshot()["running"] == 1))
        self.assertAlmostEqual(sys.getswitchinterval(), 0.0002, places=6)  # one still runs
        made[1].release.set()
        self.assertTrue(wait_for(lambda: pool.snapshot()["running"] == 0))
        self.assertEqual(sys.getswitchinterval(), before)
        # An interval somebody set while jobs ran is theirs: it stays.
        again = FakeJob("again")
        pool.admit(again)
        pool.activate(again)
        self.assertTrue(again.ran.wait(10))
        sys.setswitchinterval(0.003)
        again.release.set()
        self.assertTrue(wait_for(lambda: pool.snapshot()["running"] == 0))
        self.assertAlmostEqual(sys.getswitchinterval(), 0.003, places=6)


class TestJobPoolStreams(unittest.TestCase):
    layer = TEST_VIEWS_WAITRESS_TESTING

    def setUp(self):
        self.clients = []
        del views.EVENTS[:]

    def tearDown(self):
        for tag in list(views.GATES):
            views.gate(tag).set()
        for client in self.clients:
            client.close()
        self.assertTrue(wait_for_streams_to_end())
        self.assertTrue(jobs_done())

    def open(self, query, **options):
        options.setdefault("auth", OWNER)
        client = open_stream(self.layer, f"{POOL}?{query}", **options)
        self.clients.append(client)
        return client

    def anonymous(self, query, n):
        """An anonymous client of its own address (per-address limits)."""
        return self.open(query, auth=None, source=f"127.0.0.{n + 1}")

    def started(self, tag):
        return views.events("start", tag=tag)

    # -- leaving, backpressure, the request's writes ------------------------
    # (The README's own CSV export and batch job on the pool: test_plone_pool.)

    def test_a_client_that_leaves_stops_the_job_at_its_next_chunk_and_aborts_since_the_commit(
        self,
    ):
        client = self.open("tag=b1&mode=batch&count=25&hold=14&run_on=pool")
        client.read_until(b"created 14\n")
        # On a job thread, in the transaction of the stream's own manager.
        start = self.started("b1")[0]
        self.assertTrue(start["thread"].startswith("streamguard-jobs"))
        self.assertTrue(start["manager_is_own"])
        # The job waits (outside the guard) after document 14; documents
        # 0-9 are committed, the others not.
        client.close()
        # The web side has ended: the job is told (its guard has a reason).
        self.assertTrue(
            wait_for(
                lambda: all(r.guard is None or r.guard.stopping for r in jobs.job_streams.live())
            )
        )
        views.gate("b1").set()
        self.assertTrue(wait_for(lambda: views.events("producer-finally", tag="b1")))
        self.assertTrue(jobs_done())
        # Document 15 was made in the step that was running; its chunk was
        # the producer's last yield (GeneratorExit there): nothing after.
        self.assertEqual([e["n"] for e in views.events("step", tag="b1")][-1], 15)
        self.assertTrue(views.events("generator-exit", tag="b1"))
        self.assertEqual(views.events("cleanup", tag="b1")[0]["reason"], "client gone")
        site = committed_site(self)
        self.assertEqual([n for n in range(25) if f"b1-{n}" in site], list(range(10)))
        self.assertEqual(jobs.pool.snapshot()["running"], 0)

    def test_a_client_that_resets_stops_a_job_that_waits_in_the_guard(self):
        client = self.open("tag=busy-reset&mode=busy&run_on=pool")
        client.read_until(b"busy 2\n")
        client.reset()
        self.assertTrue(wait_for(lambda: views.events("producer-finally", tag="busy-reset")))
        self.assertTrue(jobs_done())
        self.assertEqual(views.events("cleanup", tag="busy-reset")[0]["reason"], "client gone")

    def test_a_client_that_does_not_read_holds_the_job_back(self):
        client = self.open("tag=fl&mode=flood&run_on=pool")
        client.head()
        # The job blocks in the relay's put(): the client's queue (and the
        # relay) are above their high-water marks.
        self.assertTrue(wait_for(job_blocked_in_put))
        made = views.FLOODED["fl"]
        # Bounded by what the kernel's buffers, the client's queue and the
        # relay hold: far below what an unbounded job makes meanwhile.
        self.assertLess(made, 64 << 20)
        # The client reads: the job goes on.
        client.read_exactly(made + (1 << 20))
        self.assertGreater(views.FLOODED["fl"], made)
        client.close()
        self.assertTrue(wait_for(lambda: views.events("producer-finally", tag="fl")))

    def test_max_duration_stops_the_job(self):
        client = self.open("tag=md&mode=busy&run_on=pool&max_duration=0.5")
        client.read_until(b"busy 1\n")
        # Ends cleanly, as a stream that timed out in process does.
        self.assertTrue(client.body().startswith(b"busy 1\n"))
        self.assertTrue(wait_for(lambda: views.events("cleanup", tag="md")))
        self.assertEqual(views.events("cleanup", tag="md")[0]["reason"], "timeout")

    def test_the_job_sees_what_its_request_wrote(self):
        # The job starts after the request's transaction has committed.
        body = self.open("tag=seen&mode=sees&run_on=pool").body()
        self.assertEqual(body, b"seen\n")
        self.assertEqual(views.events("sees", tag="seen")[0]["mark"], "seen")

    # -- the queue -----------------------------------------------------------

    def test_ten_busy_streams_on_a_pool_of_two(self):
        running, queued = [], []
        for n in range(10):
            client = self.anonymous(f"tag=q{n}&mode=busy&run_on=pool", n)
            self.assertEqual(client.head()[0], 200)
            if n < 2:
                client.read_until(b"busy 1\n")
                running.append(client)
            else:
                # Told so, in its first line.
                client.read_until(f"queued: position {n - 1}\n".encode())
                queued.append(client)
        status = json.loads(
            http_request(
                (self.layer["host"], self.layer["port"]),
                "/plone/@@stream-status?format=json",
                auth=OWNER,
            )[2]
        )
        self.assertEqual(status["places"]["pool"], 2)
        self.assertEqual(status["places"]["queued"], 8)
        positions = sorted(s["position"] for s in status["live"] if s["runs"] == "queued")
        self.assertEqual(positions, list(range(1, 9)))
        # Pages answer throughout (waitress' threads are all free).
        for _ in range(3):
            page = http_request((self.layer["host"], self.layer["port"]), "/plone", auth=OWNER)
            self.assertEqual(page[0], 200)
        # The last one leaves while it waits: it never starts.
        queued[-1].close()
        self.assertTrue(wait_for(lambda: jobs.pool.snapshot()["queued"] == 7))
        # Each queued one starts when a slot frees.
        for n in range(9):
            views.gate(f"q{n}").set()
            if n + 2 < 9:
                queued[n].read_until(b"busy 1\n")
        for client in running + queued[:-1]:
            client.body()
        self.assertTrue(wait_for_streams_to_end())
        self.assertTrue(jobs_done())
        self.assertEqual(self.started("q9"), [])
        self.assertEqual(len(views.events("start")), 9)

    def test_server_sent_events_hear_their_place_and_their_start(self):
        # Anonymous, from addresses of their own: one user may hold 2 streams.
        busy = [self.anonymous(f"tag=s{n}&mode=busy&run_on=pool", n) for n in range(2)]
        for client in busy:
            client.read_until(b"busy 1\n")
        first = self.anonymous("tag=s2&mode=busy&run_on=pool", 2)
        first.read_until(b"queued: position 1\n")
        sse = self.anonymous("tag=s3&mode=busy&run_on=pool&type=text/event-stream", 3)
        sse.read_until(b'event: queued\ndata: {"position": 2}\n\n')
        views.gate("s0").set()
        sse.read_until(b'event: queued\ndata: {"position": 1}\n\n')
        views.gate("s1").set()
        sse.read_until(b"event: started\ndata: {}\n\n")
        sse.read_until(b"busy 1\n")

    def test_past_the_queue_streams_are_refused_with_a_jittered_retry_after(self):
        self.addCleanup(jobs.pool.configure, jobs.pool.size, jobs.pool.queue_size)
        set_product_config(self, **{"job-pool-size": "1", "job-queue-size": "1"})
        self.anonymous("tag=f0&mode=busy&run_on=pool", 0).read_until(b"busy 1\n")
        self.anonymous("tag=f1&mode=busy&run_on=pool", 1).read_until(b"queued: position 1\n")
        refused = self.anonymous("tag=f2&mode=busy&run_on=pool", 2)
        status, headers = refused.head()
        self.assertEqual(status, 503)
        self.assertIn(int(headers["retry-after"]), range(10, 21))
        self.assertIn(b"job pool", refused.body())
        self.assertEqual(self.started("f2"), [])

    def test_jobs_shorten_the_switch_interval_as_zope_conf_says(self):
        self.addCleanup(jobs.pool.configure, jobs.pool.size, jobs.pool.queue_size)
        before = sys.getswitchinterval()
        for setting, expected in (
            (None, jobs.DEFAULT_SWITCH_INTERVAL),
            ("0.2", 0.0002),
            ("off", before),
            ("fast", jobs.DEFAULT_SWITCH_INTERVAL),  # not milliseconds: the default
        ):
            with self.subTest(setting=setting):
                if setting is not None:
                    set_product_config(self, **{"job-switch-interval": setting})
                tag = f"si-{setting}"
                client = self.open(f"tag={tag}&mode=busy&run_on=pool")
                client.read_until(b"busy 1\n")
                self.assertAlmostEqual(sys.getswitchinterval(), expected, places=6)
                views.gate(tag).set()
                client.body()
                self.assertTrue(jobs_done())
                self.assertTrue(wait_for(lambda: jobs.pool.snapshot()["running"] == 0))
                self.assertEqual(sys.getswitchinterval(), before)

    # -- failures and security ---------------------------------------------

    def test_a_job_that_raises_is_logged_once_told_aborted_and_gives_its_slot_back(self):
        lines = AllLogLines.attach(self)
        text = self.open("tag=e1&mode=error&run_on=pool")
        with self.assertRaisesRegex(AssertionError, "server closed before the body"):
            text.body()
        sse = self.open("tag=e2&mode=error&run_on=pool&type=text/event-stream")
        sse.read_until(b"one line\n")
        sse.read_until(b"event: error\ndata: the stream failed on the server\n\n")
        self.assertTrue(sse.closed())
        self.assertTrue(wait_for_streams_to_end())
        self.assertTrue(jobs_done())
        tracebacks = [t for t in lines.texts if "the job failed on purpose" in t]
        self.assertEqual(len(tracebacks), 2)  # once per stream
        self.assertFalse(hasattr(committed_site(self), "_streamguard_mark"))
        self.assertEqual(jobs.pool.snapshot()["running"], 0)
        # The slot is back: the next job runs.
        self.assertEqual(self.open("tag=e3&mode=sees&run_on=pool").body(), b"e3\n")

    def test_the_job_runs_as_the_user_who_asked_with_that_users_permissions(self):
        for auth, user, manage in (
            (OWNER, SITE_OWNER_NAME, True),
            ((TEST_USER_NAME, TEST_USER_PASSWORD), TEST_USER_ID, False),
        ):
            with self.subTest(user=user):
                tag = f"who-{user}"
                body = self.open(f"tag={tag}&mode=whoami&run_on=pool", auth=auth).body()
                self.assertEqual(body, f"{user}\n".encode())
                (seen,) = views.events("whoami", tag=tag)
                self.assertEqual((seen["user"], seen["manage"], seen["view"]), (user, manage, True))
                self.assertTrue(self.started(tag)[0]["thread"].startswith("streamguard-jobs"))

    def test_status_names_the_pool_in_json_and_html(self):
        client = self.open("tag=st&mode=busy&run_on=pool")
        client.read_until(b"busy 1\n")
        address = (self.layer["host"], self.layer["port"])
        status, _headers, body = http_request(
            address, "/plone/@@stream-status?format=json", auth=OWNER
        )
        data = json.loads(body)
        (stream,) = [s for s in data["live"] if "streamguard-test-pool" in s["label"]]
        self.assertEqual(stream["runs"], "pool")
        self.assertEqual(data["pool"]["running"], 1)
        page = http_request(address, "/plone/@@stream-status", auth=OWNER)[2].decode()
        self.assertTrue(re.search(r"<th>pool</th>\s*<td>1</td>", page), page[:3000])
