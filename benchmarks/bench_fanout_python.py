"""The Python a fan-out costs per parked viewer, the send left out.

N SSE ``LogStream``s of one file, on an in-process waitress
(``tests.parkapp.PollingServer`` with the add-on's parking), all parked.
Then each parked stream's socket is swapped for a stand-in whose
``send()`` takes everything at once (a stand-in on purpose: the system
call is what ``bench_parked_streams.py`` measures with real clients; here
only the Python around it is timed, which real sockets would drown in the
send's noise).  A line is appended ``--rounds`` times; the hub's inotify
dispatch is timed, and the first dispatch of each round (the one with the
new line; a writer that closes the file makes a second, with nothing to
read) is divided by N.  The opening is paced by the hub's count: past
waitress' admission bound some openings are refused (503), and N is the
number that parked.

Run from the repository root, after ``make install-test``::

    .venv/bin/python benchmarks/bench_fanout_python.py [--viewers 5000] [--rounds 12]

Nothing is asserted.  Both ends live in this process: 2 fds per viewer.
"""

import argparse
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from collective.streamguard import hub as hubs  # noqa: E402
from collective.streamguard.connection import client_connection  # noqa: E402
from collective.streamguard.guard import GuardedStream  # noqa: E402
from collective.streamguard.guard import StreamGuard  # noqa: E402
from collective.streamguard.logs import inotify  # noqa: E402
from collective.streamguard.logs.follower import LogFollower  # noqa: E402
from collective.streamguard.logs.stream import LogStream  # noqa: E402
from collective.streamguard.streams import LiveStreams  # noqa: E402
from collective.streamguard.tests.parkapp import PollingServer  # noqa: E402
from collective.streamguard.waitress import park as waitress_park  # noqa: E402
from collective.streamguard.waitress.output import DirectOutput  # noqa: E402


class TakesAll:
    """Stand-in for a parked viewer's socket: takes every byte at once."""

    def send(self, data):
        return len(data)


def timed_dispatches():
    """Time every dispatch of the shared inotify instance (made before the
    instance is: it binds its dispatch when it starts)."""
    times = []
    dispatch = inotify.SharedInotify._dispatch

    def timed(self):
        started = time.perf_counter()
        dispatch(self)
        times.append(time.perf_counter() - started)

    inotify.SharedInotify._dispatch = timed
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--viewers", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    times = timed_dispatches()
    path = os.path.join(tempfile.mkdtemp(), "event.log")
    with open(path, "w") as f:
        f.write("start\n")
    live = LiveStreams()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        guard = StreamGuard(
            client_connection(environ),
            heartbeat=b": hb\n\n",
            heartbeat_interval=3600,
            live_streams=live,
        )
        follower = LogFollower(path, offset=os.path.getsize(path))
        follower.open()  # as @@stream-log does: it then knows inotify reports
        return GuardedStream(
            LogStream(follower, sse=True),
            guard,
            park=waitress_park.park,
            direct_output=DirectOutput.for_caller,
        )

    server = PollingServer.create(
        app,
        threads=4,
        asyncore_use_poll=True,
        connection_limit=args.viewers + 100,
        expose_tracebacks=False,
    )
    server.wait()
    waitress_park.install(server)
    while server.channel_class is not waitress_park.ParkingChannel:
        time.sleep(0.01)
    address = (server.adj.host, server.adj.port)
    clients = []
    for n in range(args.viewers):
        sock = socket.create_connection(address)
        sock.sendall(b"GET /log HTTP/1.1\r\nHost: localhost\r\n\r\n")
        clients.append(sock)
        if n % 100 == 99:
            while hubs.hub().count() < n - 150:
                time.sleep(0.01)
    hub = hubs.hub()
    parked = -1
    while hub.count() != parked:
        parked = hub.count()
        time.sleep(0.5)
    for stream in list(hub.handlers.values()):
        stream.sock = TakesAll()
    per_viewer = []
    for n in range(args.rounds):
        before = len(times)
        with open(path, "a") as f:
            f.write(f"2026-12-07 01:02:03,456 INFO [Zope] line {n} something happened\n")
        while len(times) == before:
            time.sleep(0.2)
        time.sleep(0.3)  # a second dispatch (the close), if any, is left out
        per_viewer.append(times[before] / parked * 1e6)
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# in-process waitress, 4 threads; {parked} parked SSE viewers of {args.viewers}")
    print(f"{'viewers':>8} {'rounds':>6} {'us/viewer median':>16} {'min':>6} {'max':>6}")
    print(
        f"{parked:>8} {len(per_viewer):>6} {statistics.median(per_viewer):>16.2f} "
        f"{min(per_viewer):>6.2f} {max(per_viewer):>6.2f}",
        flush=True,
    )
    # The parked streams and their sockets go with the process.
    os._exit(0)


if __name__ == "__main__":
    main()
