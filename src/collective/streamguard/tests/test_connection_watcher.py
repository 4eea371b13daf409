"""The watcher thread behind ``on_close``, on plain loopback sockets."""

import os
import signal
import threading
import unittest

from collective.streamguard import client_connection
from collective.streamguard import watcher
from collective.streamguard.probes import FdConnection
from collective.streamguard.tests.helpers import SocketTestCase
from collective.streamguard.tests.helpers import sweeps_later
from collective.streamguard.tests.helpers import wait_for

SOON = 5.0


class Recorder:
    def __init__(self):
        self.calls = []
        self.event = threading.Event()

    def __call__(self):
        self.calls.append(threading.current_thread().name)
        self.event.set()


class WatcherTests(SocketTestCase):
    def setUp(self):
        super().setUp()
        # Sweep twenty times a second, so that waiting for sweeps is short.
        self.sweep_interval = watcher.SWEEP_INTERVAL
        watcher.SWEEP_INTERVAL = 0.05
        watcher.stop()

    def tearDown(self):
        watcher.stop()
        watcher.SWEEP_INTERVAL = self.sweep_interval
        super().tearDown()

    def watched(self):
        server, client = self.pair()
        recorder = Recorder()
        handle = client_connection({"gunicorn.socket": server}).on_close(recorder)
        return server, client, recorder, handle

    def past_sweeps(self):
        """Wait until the watcher has swept twice more: every watched
        connection was asked again since the test's last step."""
        self.assertTrue(
            sweeps_later(watcher._current(), timeout=SOON), "the watcher stopped sweeping"
        )

    def test_fires_once_in_the_watcher_thread_when_client_leaves(self):
        _, client, recorder, handle = self.watched()
        self.past_sweeps()
        self.assertEqual(recorder.calls, [])
        client.close()
        self.assertTrue(recorder.event.wait(SOON))
        self.past_sweeps()
        self.assertEqual(recorder.calls, ["collective.streamguard watcher"])
        self.assertTrue(handle.fired)
        self.assertFalse(handle.cancel())

    def test_cancelled_callback_never_fires(self):
        _, client, recorder, handle = self.watched()
        self.assertTrue(handle.cancel())
        self.assertFalse(handle.cancel())
        client.close()
        self.past_sweeps()
        self.assertEqual(recorder.calls, [])
        self.assertFalse(handle.fired)

    def test_already_closed_fires_at_once(self):
        server, client = self.pair()
        client.close()
        recorder = Recorder()
        client_connection({"gunicorn.socket": server}).on_close(recorder)
        self.assertTrue(recorder.event.wait(0.5))

    def test_socket_closed_by_the_server_is_found_by_the_sweep(self):
        # The kernel drops a closed fd from the epoll set without an event.
        server, _, recorder, _ = self.watched()
        self.past_sweeps()  # watched (in the epoll set) before the close
        server.close()
        self.assertTrue(recorder.event.wait(SOON))

    def test_callback_exception_is_logged_and_others_still_fire(self):
        bad_server, bad_client = self.pair()
        server, client = self.pair()
        bad = client_connection({"gunicorn.socket": bad_server})
        recorder = Recorder()
        with self.assertLogs("collective.streamguard", "ERROR") as logged:
            bad.on_close(lambda: 1 / 0)
            bad_client.close()
            self.assertTrue(wait_for(lambda: logged.output, SOON))
        self.assertIn("ZeroDivisionError", logged.output[0])
        client_connection({"gunicorn.socket": server}).on_close(recorder)
        client.close()
        self.assertTrue(recorder.event.wait(SOON))

    def test_two_callbacks_on_one_socket(self):
        server, client = self.pair()
        connection = client_connection({"gunicorn.socket": server})
        first, second = Recorder(), Recorder()
        connection.on_close(first)
        client_connection({"gunicorn.socket": server}).on_close(second)
        client.close()
        self.assertTrue(first.event.wait(SOON) and second.event.wait(SOON))
        self.past_sweeps()
        self.assertEqual((len(first.calls), len(second.calls)), (1, 1))

    def test_reused_fd_fires_the_old_and_not_the_new(self):
        old_server, _ = self.pair()
        fd = old_server.fileno()
        old, new = Recorder(), Recorder()
        FdConnection(fd, "uwsgi").on_close(old)
        self.past_sweeps()  # watched before its fd is reused
        new_server, new_client = self.pair()
        os.dup2(new_server.fileno(), fd)  # the old socket is gone, fd reused
        FdConnection(fd, "uwsgi").on_close(new)
        self.assertTrue(old.event.wait(SOON))
        self.past_sweeps()
        self.assertFalse(new.event.is_set())
        new_client.close()
        self.assertTrue(new.event.wait(SOON))

    def test_without_epoll_the_sweep_fires(self):
        server, client = self.pair()
        sweeper = watcher.Watcher(use_epoll=False)
        try:
            recorder = Recorder()
            sweeper.watch(client_connection({"gunicorn.socket": server}), recorder)
            client.close()
            self.assertTrue(recorder.event.wait(SOON))
        finally:
            sweeper.stop()
        self.assertFalse(sweeper.alive)

    def test_stop_and_restart(self):
        _, client, stopped, _ = self.watched()
        thread = watcher._watcher._thread
        watcher.stop()
        self.assertFalse(thread.is_alive())
        client.close()
        _, client, recorder, _ = self.watched()
        client.close()
        self.assertTrue(recorder.event.wait(SOON))
        # The new watcher has done its work and swept since: the old
        # callback had all that time.
        self.past_sweeps()
        self.assertEqual(stopped.calls, [])  # stopped means never

    @unittest.skipUnless(hasattr(os, "fork"), "needs fork")
    def test_forked_worker_gets_its_own_watcher(self):
        # gunicorn and uWSGI fork their workers after the app is imported
        # (and maybe after a watcher was started in the parent).
        self.watched()
        parent_thread = watcher._watcher._thread
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by exit code
            code = 1
            try:
                server, client = self.pair()
                recorder = Recorder()
                client_connection({"gunicorn.socket": server}).on_close(recorder)
                client.close()
                fired = recorder.event.wait(SOON)
                code = 0 if fired and watcher._watcher._thread is not parent_thread else 2
            finally:
                os._exit(code)
        statuses = []

        def reaped():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses.append(status)
            return done

        if not wait_for(reaped, 2 * SOON):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.fail("forked child hung")
        self.assertEqual(os.waitstatus_to_exitcode(statuses[0]), 0)
        self.assertTrue(parent_thread.is_alive())
