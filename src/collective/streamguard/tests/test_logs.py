"""Which logs may be streamed: Zope's own, and configured lines checked with a reason."""

import logging
import os
import shutil
import tempfile
import unittest

from collective.streamguard.logs.rules import InvalidLogEntry
from collective.streamguard.logs.rules import LogRules
from collective.streamguard.logs.rules import configured_logs
from collective.streamguard.logs.rules import parse_log_entry
from collective.streamguard.logs.rules import parse_log_files
from collective.streamguard.logs.rules import zope_logs


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
        self.rules = LogRules([self.directory])

    def assert_refused(self, line, reason, rules=None):
        with self.assertRaises(InvalidLogEntry) as refused:
            parse_log_entry(line, rules or self.rules)
        self.assertIn(reason, str(refused.exception))

    def test_an_existing_regular_file(self):
        self.assertEqual(parse_log_entry(f" app | {self.log} ", self.rules), ("app", self.log))

    def test_a_file_a_writer_will_create(self):
        path = os.path.join(self.directory, "later.log")
        self.assertEqual(parse_log_entry(f"later|{path}", self.rules), ("later", path))

    def test_only_the_deployments_directories(self):
        elsewhere = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, elsewhere)
        other = os.path.join(elsewhere, "other.log")
        with open(other, "w") as f:
            f.write("x\n")
        self.assert_refused(f"other|{other}", "not in a log directory of this deployment")
        self.assert_refused(f"app|{self.log}", "not in a log directory", rules=LogRules([]))
        # A subdirectory of an allowed one is allowed.
        sub = os.path.join(self.directory, "sub")
        os.mkdir(sub)
        self.assertEqual(parse_log_entry(f"sub|{sub}/a.log", self.rules)[1], f"{sub}/a.log")

    def test_secrets_are_refused_whatever_the_deployment_allows(self):
        everything = LogRules(["/"])
        self.assert_refused("env|/proc/self/environ", "under /proc", everything)
        self.assert_refused("mem|/proc/self/mem", "under /proc", everything)
        self.assert_refused("sys|/sys/kernel/mm/transparent_hugepage/enabled", "/sys", everything)
        self.assert_refused("tty|/dev/null", "under /dev", everything)
        for name in ("Data.fs", "Data.fs.index", "Data.fs.lock", "zope.conf", "zope.ini"):
            path = os.path.join(self.directory, name)
            with open(path, "w") as f:
                f.write("secret\n")
            self.assert_refused(f"x|{path}", "ZODB or configuration file", everything)
        blobs = os.path.join(self.directory, "blobstorage")
        os.makedirs(os.path.join(blobs, "0x00"))
        with open(os.path.join(blobs, ".layout"), "w") as f:
            f.write("bushy\n")
        self.assert_refused(f"b|{blobs}/0x00/blob.log", "blob directory", everything)
        etc = os.path.join(self.directory, "etc")
        os.mkdir(etc)
        self.assert_refused(f"site|{etc}/site.log", "never a log", LogRules(["/"], refused=[etc]))

    def test_a_file_with_another_hard_link_is_refused(self):
        secret = os.path.join(self.directory, "secret.txt")
        with open(secret, "w") as f:
            f.write("TOP SECRET\n")
        linked = os.path.join(self.directory, "linked.log")
        os.link(secret, linked)
        self.assert_refused(f"linked|{linked}", "2 hard links")

    def test_refusals_say_why(self):
        self.assert_refused(f"app {self.log}", "write a name, '|'")
        self.assert_refused(f"../app|{self.log}", "a name is 1 to 64")
        self.assert_refused(f"event|{self.log}", "Zope's own event log")
        self.assert_refused("app|relative/app.log", "not an absolute path")
        self.assert_refused(f"app|{self.directory}/../app.log", "not normalized")
        self.assert_refused(f"app|{self.log}/", "not normalized")
        self.assert_refused("app|/no/such/dir/app.log", "does not exist")
        os.mkdir(os.path.join(self.directory, "adir"))
        self.assert_refused(f"app|{self.directory}/adir", "not a regular file")
        self.assert_refused("app|/tmp/a\0b", "NUL")
        link = os.path.join(self.directory, "link.log")
        os.symlink(self.log, link)
        self.assert_refused(f"app|{link}", "symbolic link")

    def test_a_name_twice(self):
        with self.assertRaises(InvalidLogEntry) as refused:
            parse_log_files([f"app|{self.log}", f"app|{self.log}"], self.rules)
        self.assertIn("configured twice", str(refused.exception))

    def test_lines_no_longer_acceptable_are_left_out_at_use(self):
        link = os.path.join(self.directory, "link.log")
        os.symlink(self.log, link)
        with self.assertLogs("collective.streamguard", "WARNING"):
            logs, unavailable = configured_logs([f"app|{self.log}", f"gone|{link}", ""], self.rules)
        self.assertEqual(logs.get("app"), self.log)
        self.assertNotIn("gone", logs)
        self.assertIn("symbolic link", unavailable["gone"])


class TestCachedAnswers(unittest.TestCase):
    """Configured logs are checked at every request; what is kept between
    requests (a directory's verdict) is asked again when what it was about
    changed, and the file itself is always looked at."""

    def setUp(self):
        self.top = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.top)
        self.directory = os.path.join(self.top, "logs")
        os.mkdir(self.directory)
        self.log = os.path.join(self.directory, "app.log")
        with open(self.log, "w") as f:
            f.write("x\n")
        self.rules = LogRules([self.directory])
        self.line = f"app|{self.log}"

    def logs(self):
        with _quiet():
            return configured_logs([self.line], self.rules)

    def test_a_log_replaced_by_a_symbolic_link_is_refused_at_the_next_request(self):
        self.assertEqual(self.logs()[0]["app"], self.log)
        secret = os.path.join(self.top, "secret")
        with open(secret, "w") as f:
            f.write("password\n")
        os.remove(self.log)
        os.symlink(secret, self.log)
        logs, unavailable = self.logs()
        self.assertNotIn("app", logs)
        self.assertIn("symbolic link", unavailable["app"])

    def test_a_log_replaced_by_a_hard_link_is_refused_at_the_next_request(self):
        self.assertEqual(self.logs()[0]["app"], self.log)
        secret = os.path.join(self.directory, "secret.txt")
        with open(secret, "w") as f:
            f.write("password\n")
        os.remove(self.log)
        os.link(secret, self.log)
        logs, unavailable = self.logs()
        self.assertNotIn("app", logs)
        self.assertIn("hard links", unavailable["app"])

    def test_a_directory_swapped_for_a_link_elsewhere_is_checked_again(self):
        self.assertEqual(self.logs()[0]["app"], self.log)
        # The log directory becomes a symbolic link to a directory the
        # deployment does not allow, holding a file of the same name.
        elsewhere = os.path.join(self.top, "elsewhere")
        os.mkdir(elsewhere)
        with open(os.path.join(elsewhere, "app.log"), "w") as f:
            f.write("not a log of ours\n")
        moved = os.path.join(self.top, "moved")
        os.rename(self.directory, moved)
        os.symlink(elsewhere, self.directory)
        logs, unavailable = self.logs()
        self.assertNotIn("app", logs)
        self.assertIn("not in a log directory", unavailable["app"])

    def test_a_refused_directory_that_becomes_allowed_is_let_in(self):
        rules = LogRules([])
        with _quiet():
            self.assertIn("app", configured_logs([self.line], rules)[1])
        # Another deployment's rules: not the same answers.
        self.assertEqual(self.logs()[0]["app"], self.log)


class _quiet:
    """Swallow the add-on's warnings about left-out lines."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("collective.streamguard")
        self.disabled, self.logger.disabled = self.logger.disabled, True

    def __exit__(self, *exc_info):
        self.logger.disabled = self.disabled
