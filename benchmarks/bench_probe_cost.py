"""What one ``is_browser_connection_open`` call costs, and whether it grows
with the number of other open connections in the process.

Run from the repository root with the venv that has waitress:

    PYTHONPATH=src /tmp/pinvenv/bin/python benchmarks/bench_probe_cost.py

The process holds N other open loopback TCP connections (N = 10, 1,000,
10,000; their client ends live in a child process, so the fds fit under
RLIMIT_NOFILE, whose soft limit is raised to the hard one).  Every accepted
socket is wrapped, as the servers do, in a real ``waitress.channel.HTTPChannel``
and in an asyncore dispatcher of a class named ``zhttp_channel`` registered in
``asyncore.socket_map`` (ZServer's contract; ZServer itself runs on Python
2.7 only).  The request under test is the last connection made.

Timed with timeit: each cell is the median over 7 repeats of the mean time
per call (autoranged, >= 0.2 s per repeat).  Nothing is asserted; targets
from the issue: <= 10 us per call, and 10,000/10 ratio <= 1.5.
"""

import logging
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import timeit
import warnings
from types import SimpleNamespace

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel

from collective.streamguard import is_browser_connection_open
from collective.streamguard.connection import ENVIRON_KEY

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore


SIZES = (10, 1_000, 10_000)

CLIENT = textwrap.dedent("""
    import socket, sys
    address = (sys.argv[1], int(sys.argv[2]))
    held = []
    for line in sys.stdin:
        for _ in range(int(line)):
            held.append(socket.create_connection(address))
        print(len(held), flush=True)
""")


class zhttp_channel(asyncore.dispatcher):
    """ZServer's channel as far as the probes and the naive scan see it."""

    closed = 0

    def __init__(self, sock, creation_time):
        asyncore.dispatcher.__init__(self, sock)  # joins asyncore.socket_map
        self.addr = sock.getpeername()
        self.creation_time = creation_time


class Request:
    def __init__(self, environ, channel=None):
        self.environ = environ
        self.response = SimpleNamespace(stdout=SimpleNamespace(_channel=channel))


def naive_is_browser_connection_open(request):
    """A naive scan of asyncore.socket_map (the recipe passed around for ZServer)."""
    creation_time = request.environ["channel.creation_time"]
    for cnxn in asyncore.socket_map.values():
        if isinstance(cnxn, zhttp_channel) and cnxn.creation_time == creation_time:
            return True
    return False


class Connections:
    """Loopback connections whose client ends a child process holds."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        host, port = self.listener.getsockname()
        self.child = subprocess.Popen(
            [sys.executable, "-c", CLIENT, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.accepted = []
        self.adj = Adjustments()
        self.waitress_server = SimpleNamespace(active_channels={})
        self.waitress_map = {}
        self.channels = []  # (waitress channel, zhttp_channel)

    def grow_to(self, total):
        more = total - len(self.accepted)
        accepted = []
        acceptor = threading.Thread(
            target=lambda: accepted.extend(self.listener.accept()[0] for _ in range(more))
        )
        acceptor.start()
        self.child.stdin.write(f"{more}\n")
        self.child.stdin.flush()
        self.child.stdout.readline()
        acceptor.join()
        start = int(time.time()) - 10 * total
        for index, sock in enumerate(accepted, len(self.accepted)):
            channel = HTTPChannel(
                self.waitress_server,
                sock,
                sock.getpeername(),
                self.adj,
                map=self.waitress_map,
            )
            # Distinct creation seconds: the naive scan meets no early match.
            self.channels.append((channel, zhttp_channel(sock, start + index)))
        self.accepted += accepted

    def close(self):
        self.child.stdin.close()
        self.child.wait(30)
        for channel, zchannel in self.channels:
            zchannel.del_channel()
            channel.close()
        self.listener.close()


def per_call(function, argument):
    timer = timeit.Timer(lambda: function(argument))
    number, _ = timer.autorange()  # enough calls for >= 0.2 s
    return statistics.median(t / number for t in timer.repeat(repeat=7, number=number))


def measure(rows):
    results = []
    for name, function, argument in rows:
        assert function(argument), name  # open, so the timed path is the real one
        results.append((name, per_call(function, argument)))
    return results


def cases(connections):
    from collective.streamguard.probes import FdConnection

    channel, zchannel = connections.channels[-1]
    waitress_environ = {"waitress.client_disconnected": channel.check_client_disconnected}
    gunicorn_environ = {"gunicorn.socket": channel.socket}
    fd_environ = {ENVIRON_KEY: FdConnection(channel.socket.fileno(), "uwsgi")}
    zserver_environ = {
        "channel.creation_time": zchannel.creation_time,
        "REMOTE_ADDR": zchannel.addr[0],
    }
    results = measure(
        [
            (
                "waitress (Zope request)",
                is_browser_connection_open,
                Request(waitress_environ),
            ),
            ("gunicorn (WSGI environ)", is_browser_connection_open, gunicorn_environ),
            (
                "uWSGI fd + inode check (environ)",
                is_browser_connection_open,
                fd_environ,
            ),
            (
                "ZServer exact channel (request)",
                is_browser_connection_open,
                Request({}, zchannel),
            ),
            (
                "ZServer scan, pinned (environ)",
                is_browser_connection_open,
                dict(zserver_environ),
            ),
            (
                "naive: socket_map scan",
                naive_is_browser_connection_open,
                Request(zserver_environ),
            ),
        ]
    )
    # A second channel from the same address in the same second: the scan
    # can never pin and walks the whole map on every call.
    twin = connections.channels[-2][1]
    saved, twin.creation_time = twin.creation_time, zchannel.creation_time
    try:
        results += measure(
            [
                (
                    "ZServer scan, 2 in one second",
                    is_browser_connection_open,
                    dict(zserver_environ),
                ),
            ]
        )
    finally:
        twin.creation_time = saved
    return results


def main():
    # The ambiguous ZServer case logs its warning once; keep the table clean.
    logging.getLogger("collective.streamguard").setLevel(logging.ERROR)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < SIZES[-1] + 200:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} is too low for {SIZES[-1]} connections")
    connections = Connections()
    table = {}
    try:
        for size in SIZES:
            # The request's own connection and its twin come on top of N.
            connections.grow_to(size + 2)
            for name, seconds in cases(connections):
                table.setdefault(name, {})[size] = seconds
    finally:
        connections.close()
    print(
        f"Python {platform.python_version()}, waitress {waitress_version()}, "
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs; "
        f"RLIMIT_NOFILE {soft} -> {hard}"
    )
    print("Time per call, median of 7 repeats, with N other open connections:")
    header = f"{'probe':34} " + " ".join(f"{f'N={n:,}':>11}" for n in SIZES) + f" {'ratio':>9}"
    print(header)
    print("-" * len(header))
    for name, cells in table.items():
        ratio = cells[SIZES[-1]] / cells[SIZES[0]]
        print(
            f"{name:34} "
            + " ".join(f"{format_time(cells[n]):>11}" for n in SIZES)
            + f" {ratio:>8.2f}x"
        )
    print(f"ratio = time at N={SIZES[-1]:,} / time at N={SIZES[0]:,}")


def format_time(seconds):
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.2f} us"


def waitress_version():
    from importlib.metadata import version

    return version("waitress")


if __name__ == "__main__":
    main()
