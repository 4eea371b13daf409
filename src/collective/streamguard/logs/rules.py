"""Which logs may be streamed: names from configuration, never paths from a request.

Two kinds of names:

- ``event`` and ``access``: the files Zope's own logging configuration
  writes (the root logger's file handler is the event log; the ``wsgi``
  logger's, which Paste's translogger writes to, is the access log), as set
  up by ``zope.ini``/``wsgi.ini`` (``make run``, plone.recipe.zope2instance);
- names a site manager adds in the control panel, one ``name|/absolute/path``
  per line, checked by ``parse_log_entry`` when saved and again at every use.

A request only ever names a log; the path comes from this mapping.  A Plone
site manager is not a system administrator, so what the control panel may
name is bounded by the deployment (``LogRules``): a configured log must lie
in one of the allowed directories, which only the deployment's
configuration sets (zope.conf's ``<product-config collective.streamguard>``
``log-directories``; by default the directories of Zope's own event and
access logs), and whatever is allowed, these are refused: anything under
``/proc``, ``/sys`` or ``/dev``, the ZODB's files (``*.fs`` and its index,
lock and temporary files, anything in a blob directory), the instance's
configuration (``*.conf``, ``*.ini``, ``*.zcml``, ``*.cfg``), a file with
more than one hard link, and anything but a regular file.
"""

import logging
import os
import re
import stat

ZOPE_LOGS = {"event": ("root",), "access": ("wsgi",)}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Never a log, whatever the deployment allows: the kernel's pseudo-files
#: (``/proc/self/environ`` holds the process' secrets, their size reads 0
#: while they return data) and device nodes.
REFUSED_TREES = ("/proc", "/sys", "/dev")
#: The ZODB's files (Data.fs holds the Zope root user's password hash) and
#: the instance's configuration, by name.
REFUSED_NAME = re.compile(
    r".*\.(fs|fs\.index|fs\.lock|fs\.tmp|fs\.old|fs\.pack|conf|ini|zcml|cfg)", re.IGNORECASE
)
#: A blob directory (ZODB.blob) holds this file at its top.
BLOB_LAYOUT_MARKER = ".layout"


#: ``check_directory``'s answers: (rules, directory) -> (inode, refusal or None).
_directory_verdicts = {}
MAX_DIRECTORY_VERDICTS = 256


class InvalidLogEntry(ValueError):
    """A configured log line that cannot be accepted; str() says why."""


def zope_logs():
    """``{"event": path, "access": path}`` for the logs Zope writes, where it does."""
    found = {}
    for name, loggers in ZOPE_LOGS.items():
        for logger_name in loggers:
            logger = (
                logging.getLogger() if logger_name == "root" else logging.getLogger(logger_name)
            )
            for handler in logger.handlers:
                if isinstance(handler, logging.FileHandler):
                    found.setdefault(name, handler.baseFilename)
    return found


class LogRules:
    """Where configured logs may live: ``directories`` (absolute paths; the
    deployment's, never the site's), and the refusals that hold whatever
    they allow (see the module docstring)."""

    def __init__(self, directories, refused=()):
        self.directories = tuple(
            os.path.realpath(directory) for directory in directories if os.path.isabs(directory)
        )
        #: Refused like REFUSED_TREES: the instance's own etc/, for one.
        self.refused = REFUSED_TREES + tuple(
            os.path.realpath(directory) for directory in refused if os.path.isabs(directory)
        )

    def check_directory(self, directory):
        """Raise ``InvalidLogEntry`` unless files in ``directory`` may be logs.

        The answer is kept for the directory as it is now (the inode the
        path leads to): at every request a configured log's directory costs
        one ``stat()`` instead of resolving its path and looking at every
        ancestor.  A path that leads elsewhere (a directory swapped, a
        component replaced by a symbolic link) leads to another inode, and
        is checked again.  The file itself is checked at every use."""
        try:
            info = os.stat(directory)
            identity = (info.st_dev, info.st_ino)
        except OSError:
            identity = None
        key = (self.directories, self.refused, directory)
        if identity is not None:
            known = _directory_verdicts.get(key)
            if known is not None and known[0] == identity:
                if known[1] is not None:
                    raise InvalidLogEntry(known[1])
                return
        verdict = None
        try:
            self._check_directory(directory)
        except InvalidLogEntry as error:
            verdict = str(error)
        if identity is not None:
            if len(_directory_verdicts) >= MAX_DIRECTORY_VERDICTS:
                _directory_verdicts.clear()
            _directory_verdicts[key] = (identity, verdict)
        if verdict is not None:
            raise InvalidLogEntry(verdict)

    def _check_directory(self, directory):
        real = os.path.realpath(directory)
        for tree in self.refused:
            if real == tree or real.startswith(tree + "/"):
                raise InvalidLogEntry(f"{directory} is under {tree}: never a log")
        if not any(
            real == allowed or real.startswith(allowed.rstrip("/") + "/")
            for allowed in self.directories
        ):
            allowed = ", ".join(self.directories) or "none"
            raise InvalidLogEntry(
                f"{directory} is not in a log directory of this deployment ({allowed}); "
                "the directories are set in zope.conf, <product-config "
                "collective.streamguard> log-directories"
            )
        parent = real
        while True:
            if os.path.exists(os.path.join(parent, BLOB_LAYOUT_MARKER)):
                raise InvalidLogEntry(f"{directory} is in a ZODB blob directory")
            if parent == "/":
                break
            parent = os.path.dirname(parent)

    def check_name(self, path):
        if REFUSED_NAME.fullmatch(os.path.basename(path)):
            raise InvalidLogEntry(
                f"{path} is a ZODB or configuration file by its name: never a log"
            )


def check_log_path(path, rules):
    """Raise ``InvalidLogEntry`` unless ``path`` may be configured as a log.

    Acceptable: an absolute, normalized path, in a directory ``rules``
    allow, to an existing readable regular file with one link (not a
    symlink), or to a file not there yet in an existing directory, which a
    writer will create.
    """
    if not path:
        raise InvalidLogEntry("the path is empty")
    if "\0" in path:
        raise InvalidLogEntry("the path contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidLogEntry(f"{path} is not an absolute path")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise InvalidLogEntry(f"{path} is not normalized (no '..', '.', '//' or trailing '/')")
    rules.check_name(path)
    directory = os.path.dirname(path)
    if os.path.isdir(directory):
        rules.check_directory(directory)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise InvalidLogEntry(f"the directory {directory} does not exist") from None
        return
    except OSError as error:
        raise InvalidLogEntry(f"{path} cannot be examined: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise InvalidLogEntry(f"{path} is a symbolic link; name the file itself")
    if not stat.S_ISREG(info.st_mode):
        raise InvalidLogEntry(f"{path} is not a regular file")
    if info.st_nlink > 1:
        # A hard link to another file moved in place of a log would be
        # followed like a rotation.
        raise InvalidLogEntry(f"{path} has {info.st_nlink} hard links; a log has one")
    if not os.access(path, os.R_OK):
        raise InvalidLogEntry(f"{path} is not readable by the Zope process")


def parse_log_entry(line, rules):
    """``"name|/path"`` -> ``(name, path)``; raises ``InvalidLogEntry``."""
    name, separator, path = line.partition("|")
    name, path = name.strip(), path.strip()
    if not separator:
        raise InvalidLogEntry(f"{line!r}: write a name, '|' and an absolute path")
    if not NAME.fullmatch(name):
        raise InvalidLogEntry(f"{name!r}: a name is 1 to 64 letters, digits, '.', '_' or '-'")
    if name in ZOPE_LOGS:
        raise InvalidLogEntry(f"{name!r} is the name of Zope's own {name} log")
    check_log_path(path, rules)
    return name, path


def parse_log_files(lines, rules):
    """All configured lines -> ``{name: path}``; raises on the first bad one."""
    logs = {}
    for line in lines or ():
        if not line.strip():
            continue
        name, path = parse_log_entry(line, rules)
        if name in logs:
            raise InvalidLogEntry(f"{name!r} is configured twice")
        logs[name] = path
    return logs


def default_log_directories():
    """The directories of Zope's own event and access logs."""
    return sorted({os.path.dirname(path) for path in zope_logs().values()})


def configured_logs(lines, rules):
    """``(logs, unavailable)``: the logs a site can stream (``{name: path}``,
    Zope's own, then the configured ones) and the configured names it
    cannot (``{name: reason}``).

    A line that is no longer acceptable (the file was replaced by a
    symlink, its directory is no longer allowed) is logged and reported,
    not raised: the streaming view answers that the log is configured but
    unavailable, and why.
    """
    logs = zope_logs()
    unavailable = {}
    for line in lines or ():
        if not line.strip():
            continue
        name = line.partition("|")[0].strip()
        try:
            name, path = parse_log_entry(line, rules)
        except InvalidLogEntry as error:
            logging.getLogger("collective.streamguard").warning("log entry left out: %s", error)
            if NAME.fullmatch(name) and name not in logs:
                unavailable[name] = str(error)
            continue
        logs.setdefault(name, path)
    return logs, unavailable
