"""Which logs may be streamed: names from configuration, never paths from a request.

Two kinds of names:

- ``event`` and ``access``: the files Zope's own logging configuration
  writes (the root logger's file handler is the event log; the ``wsgi``
  logger's, which Paste's translogger writes to, is the access log), as set
  up by ``zope.ini``/``wsgi.ini`` (``make run``, plone.recipe.zope2instance);
- names a site manager adds in the control panel, one ``name|/absolute/path``
  per line, checked by ``parse_log_entry`` when saved.

A request only ever names a log; the path comes from this mapping.
"""

import logging
import os
import re
import stat

ZOPE_LOGS = {"event": ("root",), "access": ("wsgi",)}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def check_log_path(path):
    """Raise ``InvalidLogEntry`` unless ``path`` may be configured as a log.

    Acceptable: an absolute, normalized path to an existing readable regular
    file (not a symlink), or to a file not there yet in an existing
    directory, which a writer will create.
    """
    if not path:
        raise InvalidLogEntry("the path is empty")
    if "\0" in path:
        raise InvalidLogEntry("the path contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidLogEntry(f"{path} is not an absolute path")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise InvalidLogEntry(f"{path} is not normalized (no '..', '.', '//' or trailing '/')")
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
    if not os.access(path, os.R_OK):
        raise InvalidLogEntry(f"{path} is not readable by the Zope process")


def parse_log_entry(line):
    """``"name|/path"`` -> ``(name, path)``; raises ``InvalidLogEntry``."""
    name, separator, path = line.partition("|")
    name, path = name.strip(), path.strip()
    if not separator:
        raise InvalidLogEntry(f"{line!r}: write a name, '|' and an absolute path")
    if not NAME.match(name):
        raise InvalidLogEntry(f"{name!r}: a name is 1 to 64 letters, digits, '.', '_' or '-'")
    if name in ZOPE_LOGS:
        raise InvalidLogEntry(f"{name!r} is the name of Zope's own {name} log")
    check_log_path(path)
    return name, path


def parse_log_files(lines):
    """All configured lines -> ``{name: path}``; raises on the first bad one."""
    logs = {}
    for line in lines or ():
        if not line.strip():
            continue
        name, path = parse_log_entry(line)
        if name in logs:
            raise InvalidLogEntry(f"{name!r} is configured twice")
        logs[name] = path
    return logs


def configured_logs(lines):
    """The logs a site can stream: Zope's own, then the configured ones.

    Lines that are no longer acceptable (the file was replaced by a symlink,
    its directory removed) are left out and logged, not raised: the
    streaming view answers 404 for them.
    """
    logs = zope_logs()
    for line in lines or ():
        if not line.strip():
            continue
        try:
            name, path = parse_log_entry(line)
        except InvalidLogEntry as error:
            logging.getLogger("collective.streamguard").warning("log entry left out: %s", error)
            continue
        logs.setdefault(name, path)
    return logs
