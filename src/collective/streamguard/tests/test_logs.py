"""Which logs may be streamed: Zope's own, and configured lines checked with a reason."""

import logging
import os
import shutil
import tempfile
import unittest

from collective.streamguard.logs import InvalidLogEntry
from collective.streamguard.logs import configured_logs
from collective.streamguard.logs import parse_log_entry
from collective.streamguard.logs import parse_log_files
from collective.streamguard.logs import zope_logs


class TestZopeLogs(unittest.TestCase):
    def test_event_and_access_logs_come_from_zopes_logging_configuration(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        event = logging.FileHandler(os.path.join(directory, "event.log"), delay=True)
        access = logging.FileHandler(os.path.join(directory, "access.log"), delay=True)
        logging.getLogger().addHandler(event)
        self.addCleanup(logging.getLogger().removeHandler, event)
        logging.getLogger("wsgi").addHandler(access)
        self.addCleanup(logging.getLogger("wsgi").removeHandler, access)
        self.assertEqual(
            zope_logs(),
            {"event": event.baseFilename, "access": access.baseFilename},
        )

    def test_no_file_handlers_no_zope_logs(self):
        self.assertNotIn("access", zope_logs())


class TestConfiguredLines(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.log = os.path.join(self.directory, "app.log")
        with open(self.log, "w") as f:
            f.write("x\n")

    def assert_refused(self, line, reason):
        with self.assertRaises(InvalidLogEntry) as refused:
            parse_log_entry(line)
        self.assertIn(reason, str(refused.exception))

    def test_an_existing_regular_file(self):
        self.assertEqual(parse_log_entry(f" app | {self.log} "), ("app", self.log))

    def test_a_file_a_writer_will_create(self):
        path = os.path.join(self.directory, "later.log")
        self.assertEqual(parse_log_entry(f"later|{path}"), ("later", path))

    def test_refusals_say_why(self):
        self.assert_refused(f"app {self.log}", "write a name, '|'")
        self.assert_refused(f"../app|{self.log}", "a name is 1 to 64")
        self.assert_refused(f"event|{self.log}", "Zope's own event log")
        self.assert_refused("app|relative/app.log", "not an absolute path")
        self.assert_refused(f"app|{self.directory}/../app.log", "not normalized")
        self.assert_refused(f"app|{self.log}/", "not normalized")
        self.assert_refused("app|/no/such/dir/app.log", "does not exist")
        self.assert_refused(f"app|{self.directory}", "not a regular file")
        self.assert_refused("app|/tmp/a\0b", "NUL")
        link = os.path.join(self.directory, "link.log")
        os.symlink(self.log, link)
        self.assert_refused(f"app|{link}", "symbolic link")

    def test_a_name_twice(self):
        with self.assertRaises(InvalidLogEntry) as refused:
            parse_log_files([f"app|{self.log}", f"app|{self.log}"])
        self.assertIn("configured twice", str(refused.exception))

    def test_lines_no_longer_acceptable_are_left_out_at_use(self):
        link = os.path.join(self.directory, "link.log")
        os.symlink(self.log, link)
        with self.assertLogs("collective.streamguard", "WARNING"):
            logs = configured_logs([f"app|{self.log}", f"gone|{link}", ""])
        self.assertEqual(logs.get("app"), self.log)
        self.assertNotIn("gone", logs)
