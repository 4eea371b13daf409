"""Test only: load the real ZServer 4.0.2, a Python 2 package, on Python 3.11.

``make install-test`` installs ZServer with ``pip install --no-deps
--target .venv/zserver``, never into site-packages: its wheel also ships
top-level ``webdav``, ``Lifetime`` and ``Signals`` packages whose Python 2
files would overwrite Zope's.  ``install(directory)`` puts a finder first
on ``sys.meta_path`` that answers for ``ZServer`` and its submodules only,
from ``directory/ZServer``; the directory never goes on ``sys.path``, so
nothing else of the wheel can be imported.

What this changes, and nothing more:

- Source, in memory (nothing is written to disk): lib2to3's standard fixers
  are applied to every ZServer module before it is compiled: implicit
  relative imports (``from medusa import logger``), renamed modules
  (``cStringIO``, ``thread``, ``urllib.unquote``, ``urlparse``),
  ``basestring``, ``dict.has_key`` (also where the method is bound, not
  called, which lib2to3 leaves alone), list-returning ``dict.items()``.
- Imports, for ZServer's modules only (their own ``__builtins__``):
  ``string`` comes with Python 2's functions (``split``, ``join``,
  ``lower``, ...), ``asynchat`` with its old ``fifo`` class, and
  ``pkg_resources`` (gone from our setuptools) is a stand-in whose
  ``get_distribution`` asks ``importlib.metadata``.  The real modules are
  untouched.
- Runtime shims on ZServer's own classes: medusa's channels work in latin-1
  ``str`` as on Python 2 (``collect_incoming_data`` decodes what asynchat
  reads, asynchat encodes what is pushed); the select trigger writes
  ``b"x"``; the request body is a ``BytesIO``, as Zope's ``HTTPRequest``
  wants; ``ZServerHTTPResponse.write`` takes ``bytes`` (decoded as
  latin-1), its headers take Zope's ``bytes`` body, and it gets
  ``_shutdownRequested``, which Zope 5 removed from ``HTTPResponse``;
  ``ZServer.ZPublisher.Publish`` sees ``Zope2.bobo_application`` with
  Zope 4's ``__bobo_traverse__`` (a ZODB connection opened for the
  request, closed when the request is), which Zope 5 removed; PubCore's
  workers are ``threading.Thread`` daemons named "ZServer worker N", not
  bare ``_thread`` threads that threading meets only as dummies.

This is enough to serve GET requests through the real ``zhttp_server``,
``zhttp_channel``, PubCore worker pool, ``ZServer.ZPublisher.Publish``,
``ZServerHTTPResponse`` and ``ChannelPipe``, with the real asyncore
sockets, ``socket_map``, ``creation_time`` and close handling that the
probes rely on.  It is not ZServer's Python 2 behaviour byte for byte:
text is latin-1 at the socket, bodies of POST requests, FTP, WebDAV,
the clock server and ZServer's own start-up (zope.conf, Lifetime) are not
exercised, and no claim is made for them.
"""

import builtins
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import os
import string
import sys
import types
import warnings

PACKAGE = "ZServer"
#: The release the changes above are written against.
VERSION = "4.0.2"

with warnings.catch_warnings():
    # Deprecated since 3.6 / 3.11, removed in 3.12 / 3.13; ZServer is
    # built on them.
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    import asynchat
    from lib2to3 import refactor


class ZServerMissing(RuntimeError):
    pass


def _py2_string():
    module = types.ModuleType("string", "Python 3's string module with Python 2's functions.")
    module.__dict__.update(
        (name, value) for name, value in vars(string).items() if not name.startswith("__")
    )
    for name in (
        "split",
        "lower",
        "upper",
        "strip",
        "lstrip",
        "rstrip",
        "find",
        "rfind",
        "replace",
        "count",
        "zfill",
        "capitalize",
        "ljust",
        "rjust",
        "center",
    ):
        setattr(module, name, getattr(str, name))
    module.join = lambda words, sep=" ": sep.join(words)
    module.joinfields = module.join
    module.atoi = int
    return module


class _fifo:
    """asynchat.fifo of Python 2 (gone in 3): only ``isinstance`` asks for it."""


def _py2_asynchat():
    module = types.ModuleType("asynchat", "asynchat with Python 2's fifo.")
    module.__dict__.update(vars(asynchat))
    module.fifo = _fifo
    return module


def _pkg_resources():
    module = types.ModuleType("pkg_resources", "get_distribution() from importlib.metadata.")
    module.get_distribution = lambda name: types.SimpleNamespace(
        version=importlib.metadata.version(name)
    )
    return module


_REPLACED = {
    "string": _py2_string(),
    "asynchat": _py2_asynchat(),
    "pkg_resources": _pkg_resources(),
}


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name in _REPLACED:
        return _REPLACED[name]
    return builtins.__import__(name, globals, locals, fromlist, level)


#: The builtins ZServer's modules see: only ``__import__`` differs.
BUILTINS = {**vars(builtins), "__import__": _import}

_refactoring = None


def _py3_source(source, path):
    global _refactoring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        if _refactoring is None:
            _refactoring = refactor.RefactoringTool(
                refactor.get_fixers_from_package("lib2to3.fixes"),
                {"print_function": True},
            )
        if not source.endswith("\n"):
            source += "\n"
        source = str(_refactoring.refactor_string(source, path))
    # fix_has_key rewrites calls only; ZServer also binds the method
    # (``h2ehas=header2env.has_key``).
    return source.replace(".has_key", ".__contains__")


class _Loader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        # No bytecode cache: the code is not that of the file on disk.
        path = self.get_filename(fullname)
        with open(path, encoding="utf-8") as f:
            source = _py3_source(f.read(), path)
        return compile(source, path, "exec", dont_inherit=True)

    def exec_module(self, module):
        module.__builtins__ = BUILTINS
        super().exec_module(module)
        _SHIMS.get(module.__name__, lambda module: None)(module)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, directory):
        self.directory = directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        base = os.path.join(self.directory, *fullname.split("."))
        init = os.path.join(base, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(
                fullname, init, loader=_Loader(fullname, init), submodule_search_locations=[base]
            )
        if os.path.isfile(base + ".py"):
            return importlib.util.spec_from_file_location(
                fullname, base + ".py", loader=_Loader(fullname, base + ".py")
            )
        return None


# Runtime shims, applied right after the module named is executed.


def _medusa_http_server(module):
    channel = module.http_channel
    # asynchat encodes str that is pushed (and the str terminators) with
    # this encoding; what it reads reaches medusa as latin-1 str.
    channel.use_encoding = 1
    channel.encoding = "latin-1"
    _decode_incoming(channel)


def _decode_incoming(channel):
    collect = channel.collect_incoming_data

    def collect_incoming_data(self, data):
        if isinstance(data, bytes | bytearray):
            data = bytes(data).decode("latin-1")
        return collect(self, data)

    channel.collect_incoming_data = collect_incoming_data


def _select_trigger(module):
    # The Python 2 code writes the str 'x' to the trigger's pipe.
    py2_os = types.ModuleType("os", "os whose write() takes a str, as latin-1.")
    py2_os.__dict__.update(vars(os))
    py2_os.write = lambda fd, data: os.write(
        fd, data.encode("latin-1") if isinstance(data, str) else data
    )
    module.os = py2_os


def _http_server(module):
    # Zope's HTTPRequest reads its body as bytes.
    module.StringIO = io.BytesIO
    _decode_incoming(module.zhttp_channel)  # it overrides medusa's method
    collector = module.zhttp_collector
    collect = collector.collect_incoming_data

    def collect_incoming_data(self, data):
        return collect(self, data.encode("latin-1") if isinstance(data, str) else data)

    collector.collect_incoming_data = collect_incoming_data


def _http_response(module):
    response = module.ZServerHTTPResponse
    write, to_str = response.write, response.__str__

    def bytes_write(self, data):
        if isinstance(data, bytes | bytearray):
            data = bytes(data).decode("latin-1")
        return write(self, data)

    def header_str(self):
        body = self.body
        if isinstance(body, bytes | bytearray):
            self.body = bytes(body).decode("latin-1")
        try:
            return to_str(self)
        finally:
            self.body = body

    response.write = bytes_write
    response.__str__ = header_str
    # Removed from ZPublisher's HTTPResponse in Zope 5, with shutdown
    # through the web.
    response._shutdownRequested = lambda self: False


class _Closer:
    """Closes a ZODB connection when the request drops it (Zope 4's Cleanup)."""

    def __init__(self, connection):
        self.connection = connection

    def __del__(self):
        self.connection.close()


class _TraversableApplication:
    """Zope 4's ``ZApplicationWrapper.__bobo_traverse__``, which Zope 5
    removed: ZServer's publisher traverses ``Zope2.bobo_application``
    itself, where Zope's WSGI publisher calls it for the app first."""

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def __bobo_traverse__(self, request, name=None):
        app = self.wrapper()
        request._hold(_Closer(app._p_jar))
        return app


def _publish(module):
    from App.ZApplication import ZApplicationWrapper

    get_module_info = module.get_module_info

    def module_info(module_name, *args, **kw):
        info = list(get_module_info(module_name, *args, **kw))
        # type(): the wrapper hands unknown attributes to the app's class.
        if type(info[2]) is ZApplicationWrapper:
            info[2] = _TraversableApplication(info[2])
        return tuple(info)

    module.get_module_info = module_info
    module.get_module_info.cache = get_module_info.__defaults__[0]


def _rendezvous(module):
    # PubCore starts its workers with _thread.start_new_thread: threads
    # that threading (and so the test runner) meets only as dummies, the
    # first time one of them logs.  Start them as named daemon threads.
    import threading

    counter = iter(range(1, 1000))

    def start_new_thread(function, args):
        thread = threading.Thread(
            target=function, args=args, name=f"ZServer worker {next(counter)}", daemon=True
        )
        thread.start()
        return thread.ident

    py2_thread = types.ModuleType("_thread", "_thread whose threads threading knows.")
    py2_thread.__dict__.update(vars(module._thread))
    py2_thread.start_new_thread = start_new_thread
    module._thread = py2_thread


_SHIMS = {
    "ZServer.PubCore.ZRendezvous": _rendezvous,
    "ZServer.ZPublisher.Publish": _publish,
    "ZServer.medusa.http_server": _medusa_http_server,
    "ZServer.medusa.thread.select_trigger": _select_trigger,
    "ZServer.HTTPServer": _http_server,
    "ZServer.HTTPResponse": _http_response,
}


def installed_version(directory):
    prefix = f"{PACKAGE}-"
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".dist-info"):
            return name[len(prefix) : -len(".dist-info")]
    return None


def install(directory):
    """Let ``import ZServer...`` load ZServer from ``directory`` (a
    ``pip install --target`` of ZServer VERSION), through the changes
    above.  Idempotent."""
    if not os.path.isfile(os.path.join(directory, PACKAGE, "__init__.py")):
        raise ZServerMissing(f"no {PACKAGE} package in {directory}")
    version = installed_version(directory)
    if version != VERSION:
        raise ZServerMissing(
            f"{directory} has {PACKAGE} {version}; these shims are for {PACKAGE} {VERSION}"
        )
    for finder in sys.meta_path:
        if isinstance(finder, _Finder):
            if finder.directory != directory:
                raise ZServerMissing(f"{PACKAGE} is loaded from {finder.directory} already")
            return
    sys.meta_path.insert(0, _Finder(directory))
