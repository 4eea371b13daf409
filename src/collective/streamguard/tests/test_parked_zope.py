"""Parked streams on a real Plone site served by a real waitress (4 threads).

Idle streams park and leave the threads to pages; streams that cannot park
still hold a thread under the thread cap; a ``zodb=True`` producer gets its
own connection, transaction, site and user in whatever thread runs each
resumed step, commits when it finishes and aborts when the client leaves.
"""

import os
import resource
import socket
import threading
import unittest

import transaction

from collective.streamguard import parkpolicy as parking
from collective.streamguard.streams import live_streams
from collective.streamguard.testing import STREAMGUARD_INTEGRATION_TESTING
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import MARKER
from collective.streamguard.tests.streamcases import LogTestCase
from collective.streamguard.tests.streamcases import StreamingTestCase
from collective.streamguard.tests.streamcases import parked

ZODB_PATH = "/plone/@@streamguard-test-zodb"


class Installed:
    def setUp(self):
        super().setUp()
        # The first request a waitress server publishes lets it park streams
        # (parking.install_on_first_request): make sure it was not a stream.
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)


class TestParkedUnderPlone(Installed, StreamingTestCase):
    def open_idle(self, count):
        tags = [self.tag() for _ in range(count)]
        socks = [self.open(f"tag={tag}&mode=idle") for tag in tags]
        for sock, tag in zip(socks, tags, strict=True):
            sock.read_until(f"first line of {tag}".encode())
        return tags, socks

    def test_more_idle_streams_than_threads_park_and_pages_answer(self):
        self.configure(max_streams_per_user=0)
        tags, socks = self.open_idle(8)
        self.assertTrue(wait_for(lambda: len(parked()) == 8), live_streams.live())
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)
        for sock in socks:
            sock.close()
        for tag in tags:
            self.assert_cleaned_up_once(tag, "client gone")
            self.assertEqual(len(views.events("producer-finally", tag=tag)), 1)

    def test_streams_that_block_in_wait_hold_threads_under_the_thread_cap(self):
        self.configure(max_streams_per_user=0)
        tags = [self.tag() for _ in range(3)]
        socks = [self.open(f"tag={tag}&mode=gated") for tag in tags]
        for sock, tag in zip(socks, tags, strict=True):
            sock.read_until(f"first line of {tag}".encode())
        self.assertEqual(parked(), [])
        # Each holds once it blocks in guard.wait(), just after its line.
        self.assertTrue(
            wait_for(lambda: live_streams.snapshot()["reserved_held"] == 3),
            live_streams.snapshot(),
        )
        # The fourth would take the last thread: it ends at once instead.
        fourth = self.tag()
        sock = self.open(f"tag={fourth}&mode=gated")
        self.assertTrue(sock.closed())
        self.assert_cleaned_up_once(fourth, "error")
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)
        # Idle streams still park beside them.
        idle_tags, idle_socks = self.open_idle(2)
        self.assertTrue(wait_for(lambda: len(parked()) == 2))
        for tag in tags:
            views.gate(tag).set()
        for sock, tag in zip(socks, tags, strict=True):
            sock.read_until(b"after the gate\n")
            self.assert_cleaned_up_once(tag, "finished")
        for sock in idle_socks:
            sock.close()
        for tag in idle_tags:
            self.assert_cleaned_up_once(tag, "client gone")

    def test_parking_switched_off_holds_a_thread(self):
        self.configure(park_streams=False)
        tags, socks = self.open_idle(1)
        self.assertTrue(wait_for(lambda: live_streams.live()))
        self.assertEqual(parked(), [])
        socks[0].close()
        self.assert_cleaned_up_once(tags[0], "client gone")

    def test_shutdown_ends_parked_streams_and_runs_their_cleanups(self):
        self.configure(max_streams_per_user=0)
        tags, socks = self.open_idle(5)
        self.assertTrue(wait_for(lambda: len(parked()) == 5))
        try:
            self.assertEqual(live_streams.shutdown(timeout=10), 0)
        finally:
            live_streams.shutting_down.clear()
        for tag in tags:
            self.assert_cleaned_up_once(tag, "shutdown")
        for sock in socks:
            self.assertTrue(sock.closed())


class TestStatusShowsParking(Installed, LogTestCase):
    def test_status_tells_parked_streams_from_those_holding_a_thread(self):
        self.configure(max_streams_per_user=0)
        sock, _head = self.follow("log=app&format=sse")
        gated = self.tag()
        blocking = self.open(f"tag={gated}&mode=gated")
        blocking.read_until(f"first line of {gated}".encode())
        self.assertTrue(wait_for(lambda: len(parked()) == 1))
        data = self.status_json()
        self.assertEqual(data["parked"], 1)
        self.assertEqual(data["holding_a_thread"], 1)  # the gated one
        by_label = {stream["log"] or stream["label"]: stream for stream in data["live"]}
        self.assertTrue(by_label["app"]["parked"])
        self.assertEqual(by_label["app"]["thread"], "parked")
        # The parked log stream still follows the log.
        self.write("a line while parked\n")
        sock.read_until(b"data: a line while parked")
        views.gate(gated).set()
        blocking.read_until(b"after the gate\n")
        sock.close()


class TestParkedLogStreams(Installed, LogTestCase):
    COUNT = 40

    def test_parked_log_streams_hold_their_socket_and_nothing_else(self):
        # Before: the socket plus the follower's file, directory and eventfd.
        # Now the followers of one log share its two descriptors and are
        # woken by a callback, so each parked stream adds its socket only.
        self.configure(max_streams_per_user=0)
        first, _head = self.follow("log=app&format=sse")  # the shared ones open
        self.assertTrue(wait_for(lambda: len(parked()) == 1))
        before = len(os.listdir("/proc/self/fd"))
        socks = [self.follow("log=app&format=sse")[0] for _ in range(self.COUNT)]
        self.assertTrue(wait_for(lambda: len(parked()) == self.COUNT + 1))
        # Both ends of each connection are in this process: 2 per stream.
        self.assertLessEqual(len(os.listdir("/proc/self/fd")) - before, 2 * self.COUNT + 2)
        self.write("one line for all\n")
        for sock in [first, *socks]:
            sock.read_until(b"data: one line for all\n")
        # A stream that asked for the log's last lines reads its own bytes,
        # not the shared ones of the streams beside it.
        own, _head = self.follow("log=app&format=sse&lines=1")
        own.read_until(b"data: one line for all\n")
        self.write("and a second\n")
        for sock in [first, own, *socks]:
            sock.read_until(b"data: and a second\n")
        for sock in [first, own, *socks]:
            sock.close()
        self.assertTrue(wait_for(lambda: not parked()))


def log_text(body):
    """The log's text an SSE body carried: each line event's data fields
    joined by newlines, as EventSource does, one event after the other."""
    text = []
    for event in body.split(b"\n\n"):
        fields = event.split(b"\n")
        if not any(field.startswith(b"id: ") for field in fields):
            continue  # retry, heartbeats, the end
        if any(field.startswith(b"event: ") for field in fields):
            continue  # the stream's first event: not the log's
        data = [field[6:] for field in fields if field.startswith(b"data: ")]
        text.append(b"\n".join(data).decode())
    return "".join(text)


class TestWakeSteps(Installed, LogTestCase):
    """A new line reaches parked followers from the hub, without a step on
    a worker (``guard.idle(wake_step=...)``); what the hub cannot send
    exactly (a large append, the end marker, a log swapped for a symbolic
    link) goes to a step, and nothing is lost or sent twice."""

    COUNT = 12

    def follow_parked(self, count, sse=True):
        self.configure(max_streams_per_user=0)
        socks = []
        for _ in range(count):
            sock, _head = self.follow("log=app&format=sse" if sse else "log=app")
            if sse:
                sock.read_until(b"event: stream\n")
            socks.append(sock)
        self.assertTrue(wait_for(lambda: len(parked()) == count))
        streams = [record.guard.parked for record in parked()]
        self.assertNotIn(None, streams)
        return socks, streams

    def test_a_new_line_reaches_parked_followers_without_a_step(self):
        socks, streams = self.follow_parked(self.COUNT)
        resumes = [stream.resumes for stream in streams]
        self.write("one line for all\n")
        events = [sock.read_until(b"data: one line for all\n") for sock in socks]
        self.assertTrue(all(stream.wake_steps >= 1 for stream in streams))
        self.assertEqual([stream.resumes for stream in streams], resumes)
        # The same event, id included, for every follower.
        last_events = {event[event.rindex(b"id: ") :] for event in events}
        self.assertEqual(len(last_events), 1, last_events)
        self.assertEqual(len(parked()), self.COUNT)
        for sock in socks:
            sock.close()
        self.assertTrue(wait_for(lambda: not parked()))

    def end_and_read(self, socks):
        """End every stream with the marker; each body's log text."""
        self.write(f"{MARKER}\n")
        texts = []
        for sock in socks:
            body = sock.body()
            self.assertTrue(body.endswith(b"event: end\ndata: \n\n"), body[-200:])
            texts.append(log_text(body))
        self.assertTrue(wait_for(lambda: not parked()))
        return texts

    def test_followers_in_one_state_share_one_read(self):
        # logs.stream.FanOut: once the followers have read the same line
        # (and so share the source's answer), the next line is read for
        # one of them and sent to the others from the hub as it is.
        socks, streams = self.follow_parked(self.COUNT)
        resumes = [stream.resumes for stream in streams]
        for line in ("first shared line\n", "second shared line\n"):
            self.write(line)
            events = [sock.read_until(f"data: {line}".encode()) for sock in socks]
        self.assertGreaterEqual(sum(stream.shared_sends for stream in streams), self.COUNT - 1)
        self.assertEqual([stream.resumes for stream in streams], resumes)
        last_events = {event[event.rindex(b"id: ") :] for event in events}
        self.assertEqual(len(last_events), 1, last_events)
        expected = "first shared line\nsecond shared line\n"
        self.assertEqual(self.end_and_read(socks), [expected] * self.COUNT)

    def group_them(self, socks, streams, lines):
        """Write ``lines`` one by one, each read by every client; then
        every stream waits in one group."""
        for line in lines:
            self.write(line)
            for sock in socks:
                sock.read_until(f"data: {line}".encode())
        self.assertTrue(self.in_one_group(streams))

    def end_id(self):
        """The end of the id of the event that reaches the log's end now.

        Not the line's text: a read that meets a write half done sends a
        long line in two events (the rest at the next change), and a line's
        last event has the id of the offset after it."""
        return b"-%d\n" % os.path.getsize(self.path)

    def append_more_than_one_piece(self, socks, streams):
        """Append 4,000 lines in one write (more than one 64 KiB piece),
        read to the last by every client, each stream resumed for it (a
        step catches up); the text appended."""
        resumes = [stream.resumes for stream in streams]
        lines = [f"line {number:06d} " + "x" * 60 for number in range(4000)]
        self.write("".join(line + "\n" for line in lines))
        for sock in socks:
            sock.read_until(self.end_id())
        self.assertTrue(
            all(stream.resumes > before for stream, before in zip(streams, resumes, strict=True))
        )
        return "".join(line + "\n" for line in lines)

    def in_one_group(self, streams):
        """Every stream waits in one group (told between changes: a group's
        lead leaves and joins again while a change is told)."""
        return wait_for(lambda: len({stream.group for stream in streams}) == 1 and streams[0].group)

    def test_followers_in_one_state_wait_in_one_group(self):
        # After a line served by shared sends, they wait in one group: the
        # next lines are one read and one loop over their sockets.
        socks, streams = self.follow_parked(self.COUNT)
        resumes = [stream.resumes for stream in streams]
        lines = ["first grouped line\n", "second grouped line\n", "third grouped line\n"]
        for line in lines:
            self.write(line)
            events = [sock.read_until(f"data: {line}".encode()) for sock in socks]
            self.assertTrue(self.in_one_group(streams))
        group = streams[0].group
        self.assertGreater(group.bytes_sent, 0)
        self.assertEqual([stream.resumes for stream in streams], resumes)
        last_events = {event[event.rindex(b"id: ") :] for event in events}
        self.assertEqual(len(last_events), 1, last_events)
        self.assertEqual(self.end_and_read(socks), ["".join(lines)] * self.COUNT)
        self.assertEqual(len(group), 0)

    def test_grouped_followers_woken_from_another_thread_get_every_line_once(self):
        socks, streams = self.follow_parked(4)
        self.group_them(socks, streams, ["one\n", "two\n"])
        resumes = [stream.resumes for stream in streams]
        # Resumed from this thread: each leaves the group with the group's
        # place in the log, reads from there in a step, and parks alone.
        for stream in streams:
            stream.guard.wake()
        self.assertTrue(
            wait_for(
                lambda: all(
                    stream.resumes > before and stream.state == "parked"
                    for stream, before in zip(streams, resumes, strict=True)
                )
            )
        )
        self.write("three\n")
        self.write("four\n")
        texts = self.end_and_read(socks)
        self.assertEqual(texts, ["one\ntwo\nthree\nfour\n"] * 4)

    def test_an_append_a_group_cannot_share_dissolves_it_and_reaches_each_once(self):
        # More than one piece in one write: the group's lead reads one and
        # cannot share it, so every member leaves with the group's place
        # and catches up in steps of its own.
        socks, streams = self.follow_parked(4)
        self.group_them(socks, streams, ["one\n", "two\n"])
        appended = self.append_more_than_one_piece(socks, streams)
        self.write("after\n")
        expected = "one\ntwo\n" + appended + "after\n"
        self.assertEqual(self.end_and_read(socks), [expected] * 4)

    def test_a_follower_that_stops_reading_leaves_the_group_and_loses_nothing(self):
        socks, streams = self.follow_parked(3)
        self.group_them(socks, streams, ["warm\n", "up\n"])
        stuck = socks[0]
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        lines = []
        # Lines of 50 KB, each one change: a group sends each whole, until
        # the stuck client's socket does not take one (its rest is queued,
        # and a stream with output queued waits in no group).
        while not streams[0].queued_bytes and len(lines) < 1000:
            line = f"{len(lines):06d} " + "s" * 50_000
            self.write(line + "\n")
            lines.append(line)
            for sock in socks[1:]:
                sock.read_until(self.end_id())
        self.assertGreater(streams[0].queued_bytes, 0)
        self.assertIsNone(streams[0].group)
        self.write("after\n")
        for sock in socks[1:]:
            sock.read_until(b"data: after\n")
        expected = "warm\nup\n" + "".join(line + "\n" for line in lines) + "after\n"
        self.assertEqual(self.end_and_read(socks), [expected] * 3)

    def test_text_followers_in_one_state_share_one_read(self):
        socks, streams = self.follow_parked(4, sse=False)
        for line in ("first text line\n", "second text line\n"):
            self.write(line)
            for sock in socks:
                sock.read_until(line.encode())
        self.assertGreaterEqual(sum(stream.shared_sends for stream in streams), 3)
        self.write(f"{MARKER}\n")
        for sock in socks:
            self.assertEqual(sock.body(), b"first text line\nsecond text line\n")
        self.assertTrue(wait_for(lambda: not parked()))

    def test_a_follower_that_joins_at_another_place_gets_its_own_lines_once(self):
        socks, streams = self.follow_parked(3)
        self.write("one\n")
        for sock in socks:
            sock.read_until(b"data: one\n")
        # A fourth starts at the last line: it reads "one" in a step of its
        # own, then parks among followers that got it from the hub.
        late, _head = self.follow("log=app&format=sse&lines=1")
        late.read_until(b"data: one\n")
        self.assertTrue(wait_for(lambda: len(parked()) == 4))
        self.write("two\n")
        self.write("three\n")
        texts = self.end_and_read([*socks, late])
        self.assertEqual(texts, ["one\ntwo\nthree\n"] * 4)

    def test_a_line_break_split_between_writes_reaches_every_follower_once(self):
        # A CR at the end of a piece is followed by its stream's own state
        # (its next event must not start with an empty line): such a
        # stream is never served the shared chunk.
        socks, streams = self.follow_parked(4)
        self.write("shared\n")
        for sock in socks:
            sock.read_until(b"data: shared\n")
        self.write("carriage\r")
        for sock in socks:
            sock.read_until(b"data: carriage\n")
        self.write("\nafter\n")
        self.write("last\n")
        texts = self.end_and_read(socks)
        self.assertEqual(texts, ["shared\ncarriage\nafter\nlast\n"] * 4)

    def test_what_the_hub_cannot_send_goes_to_a_step_exactly_once(self):
        socks, streams = self.follow_parked(4)
        # More than one piece (64 KiB) in one write: the hub reads one, and
        # a step sends it and catches up on the rest.
        expected = self.append_more_than_one_piece(socks, streams)
        self.assertTrue(wait_for(lambda: len(parked()) == 4))
        # The end marker, found by a wake step, ends every stream.
        self.assertEqual(self.end_and_read(socks), [expected] * 4)

    def test_a_log_swapped_for_a_symbolic_link_while_parked_is_not_sent(self):
        socks, streams = self.follow_parked(3)
        self.write("legit\n")
        for sock in socks:
            sock.read_until(b"data: legit\n")
        secret = os.path.join(self.directory, "secret.txt")
        self.write("SECRET\n", path=secret)
        os.unlink(self.path)
        os.symlink(secret, self.path)
        self.write("MORE SECRET\n", path=secret)
        for sock in socks:
            body = sock.body()
            self.assertNotIn(b"SECRET", body)
            self.assertIn(b"event: error\ndata: The log cannot be read any more.\n\n", body)
        self.assertTrue(wait_for(lambda: not parked()))


class TestParkedZODBProducer(Installed, StreamingTestCase):
    def setUp(self):
        super().setUp()
        self.db = self.layer["zodbDB"]

    def start(self, finish):
        tag = self.tag()
        query = f"tag={tag}&mode=write&park=1" + ("&finish=1" if finish else "")
        sock = self.open(query, auth=True, path=ZODB_PATH)
        sock.read_until(b"marked\n")
        self.assertTrue(
            wait_for(lambda: len(parked()) == 1),
            [(r, r.guard.parked, r.guard.parkable) for r in live_streams.live()],
        )
        # The stream is resumed every 50 ms: let it park and resume a few times.
        self.assertTrue(wait_for(lambda: parked() and parked()[0].guard.parked.resumes >= 5))
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)
        views.gate(tag).set()
        sock.read_until(b"resumed\n")
        (resumed,) = views.events("resumed", tag=tag)
        self.assertEqual(resumed["user"], "admin")
        self.assertTrue(resumed["site_is_set"])
        self.assertTrue(resumed["manager_is_own"])
        self.assertTrue(resumed["jar_is_own"])
        return tag, sock

    def test_parked_zodb_producer_commits_when_it_finishes(self):
        tag, sock = self.start(finish=True)
        sock.body()
        self.assert_cleaned_up_once(tag, "finished")
        site = self.site()
        self.assertEqual(getattr(site, "_streamguard_mark", None), tag)
        self.assertEqual(getattr(site, "_streamguard_resumed", None), tag)

    def test_parked_zodb_producer_aborts_when_the_client_leaves(self):
        tag, sock = self.start(finish=False)
        self.assertTrue(wait_for(lambda: len(parked()) == 1))
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        site = self.site()
        self.assertNotEqual(getattr(site, "_streamguard_mark", None), tag)
        self.assertNotEqual(getattr(site, "_streamguard_resumed", None), tag)


class TestZODBStreamCap(Installed, StreamingTestCase):
    def open_zodb(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=write&park=1", auth=True, path=ZODB_PATH)
        return tag, sock

    def test_streams_with_their_own_connection_leave_the_pool_to_pages(self):
        # Each holds a connection of the DB's pool while it is parked; the
        # pool's other connections are the 4 workers' (pages).
        self.configure(max_streams_per_user=0)
        limit = self.layer["zodbDB"].getPoolSize() - 4
        self.assertGreaterEqual(limit, 1)
        opened = []
        for _ in range(limit):
            tag, sock = self.open_zodb()
            sock.read_until(b"marked\n")
            opened.append((tag, sock))
        self.assertTrue(wait_for(lambda: len(parked()) == limit))
        _tag, refused = self.open_zodb()
        status, headers = refused.head()
        self.assertEqual((status, headers["retry-after"]), (503, "10"))
        self.assertIn(b"database connection of their own", refused.body())
        status, _, _ = self.get("/plone")  # pages still have connections
        self.assertEqual(status, 200)
        # One leaves: its connection is back, and the next stream gets one.
        tag, sock = opened.pop()
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        tag, sock = self.open_zodb()
        sock.read_until(b"marked\n")
        opened.append((tag, sock))
        for tag, sock in opened:
            sock.close()
            self.assert_cleaned_up_once(tag, "client gone")


class TestParkedCap(unittest.TestCase):
    def test_the_cap_never_passes_what_the_open_files_limit_allows(self):
        class Settings:
            max_parked_streams = 10**9

        derived = parking.default_max_parked_streams()
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertEqual(derived, (soft - parking.FDS_KEPT) // parking.FDS_PER_STREAM)
        self.assertEqual(parking.max_parked_streams(Settings()), derived)
        Settings.max_parked_streams = 3
        self.assertEqual(parking.max_parked_streams(Settings()), 3)
        Settings.max_parked_streams = 0
        self.assertEqual(parking.max_parked_streams(Settings()), derived)


class TestZODBSessionSteps(unittest.TestCase):
    """What a parked zodb=True stream relies on, in one process: the step
    hooks make the session current in any thread and give it back."""

    layer = STREAMGUARD_INTEGRATION_TESTING

    def test_each_step_sees_the_session_and_the_thread_gets_its_own_back(self):
        from AccessControl.SecurityManagement import getSecurityManager
        from AccessControl.SecurityManagement import setSecurityManager
        from plone.app.testing import TEST_USER_ID
        from zope.component.hooks import getSite
        from zope.component.hooks import setSite

        from collective.streamguard.guard import StreamGuard
        from collective.streamguard.probes import UnknownConnection
        from collective.streamguard.streams import LiveStreams
        from collective.streamguard.zodb import ZODBSession

        self.addCleanup(setSite, getSite())
        self.addCleanup(setSecurityManager, getSecurityManager())
        self.addCleanup(setattr, transaction.manager, "manager", transaction.manager.manager)
        session = ZODBSession(self.layer["portal"], self.layer["request"])
        guard = StreamGuard(UnknownConnection(), live_streams=LiveStreams())
        before = transaction.manager.manager
        session.open(guard)
        self.assertIs(transaction.manager.manager, session.transaction_manager)
        guard.leave_step()  # what waitress_park.park does before the first park
        self.assertIs(transaction.manager.manager, before)
        self.assertIsNone(getSite())
        seen = {}

        def step():
            own = transaction.manager.manager
            # Not always nobody: AccessControl keeps managers by thread
            # ident, and a new thread may reuse a finished thread's.
            own_user = getSecurityManager().getUser()
            guard.enter_step()
            seen["manager"] = transaction.manager.manager is session.transaction_manager
            seen["site"] = getSite() is session.site
            seen["user"] = getSecurityManager().getUser().getId()
            seen["jar"] = session.context._p_jar is session.connection
            guard.leave_step()
            seen["restored"] = transaction.manager.manager is own and getSite() is None
            seen["user_restored"] = getSecurityManager().getUser() is own_user

        for _ in range(3):  # three steps, each in a thread of its own
            seen.clear()
            thread = threading.Thread(target=step)
            thread.start()
            thread.join(10)
            self.assertEqual(
                seen,
                dict(
                    manager=True,
                    site=True,
                    user=TEST_USER_ID,
                    jar=True,
                    restored=True,
                    user_restored=True,
                ),
            )
        guard.enter_step()
        guard.reason = None
        session.end_transaction()  # not finished: aborted
        session.close()
        guard.leave_step()
        self.assertIs(transaction.manager.manager, before)
