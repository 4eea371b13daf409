"""Idle @@stream-log SSE streams on a real Zope with parking, next to asyncio.

A real Zope (``runwsgi``, waitress with 4 threads, ``asyncore_use_poll``,
``connection_limit`` above N, a throw-away FileStorage instance with the
add-on and a manager user) serves N server-sent-event streams of
``@@stream-log?log=app``, all following one log (``var/app.log``, a
configured log: not the event log, where waitress writes a warning for each
request queued while it is busy), opened by this process 50 at a time and
then left idle.  For each N the table gives:

- streams served (200 and the first event) and refused (anything else);
- worker threads held while the streams are idle (``@@stream-status``:
  streams not parked);
- a normal page's latency (``/``, 200 requests one after the other), p50 and
  p99, with N idle streams and with none;
- RSS and open fds of the server process per idle stream (the growth from
  before the streams were opened, divided by N);
- the server process' CPU while idle (15 s, heartbeats every 15 s included);
- fan-out: one line appended to the log, time until each client has it
  (p50/p99 over the N clients; one reader thread with epoll here), done
  ``--fan-outs`` times (default 5), one line at a time: the median round's
  p50 and p99 (one round alone varied 1.3-2.3x between runs at 10,000);
- disconnect: one idle stream's client closes; time until the server has
  ended it (its "ended (client gone)" line in the server's stream log),
  median of 20.

Side by side, a minimal asyncio SSE server (standard library only, in this
file, run as its own process): it follows the same file with inotify
(ctypes), sends every client each new line as an event and a heartbeat
every 15 s, and answers ``/`` with a short page.  Its disconnect time is
until ``connection_lost`` ran.

Run from the repository root, after ``make install-test``::

    .venv/bin/python benchmarks/bench_parked_streams.py [--counts 100,1000,5000]

The open-files limit of this process is raised to its hard limit and
inherited by both servers; N is skipped where N + 600 fds do not fit (the
server holds one per stream, and so does this process).
Nothing is asserted.
"""

import argparse
import base64
import collections
import json
import os
import platform
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from collective.streamguard.tests.helpers import HOST  # noqa: E402
from collective.streamguard.tests.helpers import wait_until_serving  # noqa: E402
from collective.streamguard.tests.servers import executable  # noqa: E402
from collective.streamguard.tests.servers import free_port  # noqa: E402
from collective.streamguard.tests.zopeinstance import ZopeInstance  # noqa: E402

#: Descriptors each process needs besides one per stream.
FDS_KEPT = 600
AUTH = "Basic " + base64.b64encode(b"admin:admin").decode()
BATCH = 50

SETTINGS_MODULE = """\
from zope.interface import implementer
from collective.streamguard.interfaces import IStreamSettingsProvider

class Settings:
    max_streams_per_user = 0
    max_parked_streams = 0  # derived from the open-files limit
    log_files = ["app|{log}"]

@implementer(IStreamSettingsProvider)
class Provider:
    def __call__(self):
        return Settings()
"""

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="Zope2.App" />
  <include package="collective.streamguard" />
  <include package="collective.streamguard.tests" file="test.zcml" />
  <utility factory="benchsettings.Provider"
      provides="collective.streamguard.interfaces.IStreamSettingsProvider" />
</configure>
"""

ASYNCIO_SERVER = r"""
import asyncio, ctypes, os, sys, time
path, port, events = sys.argv[1], int(sys.argv[2]), sys.argv[3]
clients = set()
log = open(events, "a", buffering=1)
libc = ctypes.CDLL(None, use_errno=True)
ifd = libc.inotify_init1(os.O_NONBLOCK)
libc.inotify_add_watch(ifd, path.encode(), 0x002)  # IN_MODIFY
position = os.path.getsize(path)
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-store\r\nConnection: close\r\n\r\nretry: 3000\n\n")
PAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

class SSE(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer, self.timer = transport, b"", None
    def data_received(self, data):
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer or self.timer is not None:
            return
        if self.buffer.startswith(b"GET /events"):
            self.transport.write(HEAD)
            clients.add(self)
            self.heartbeat()
        else:
            self.transport.write(PAGE)
            self.transport.close()
    def heartbeat(self):
        self.transport.write(b": keep-alive\n\n")
        self.timer = asyncio.get_running_loop().call_later(15, self.heartbeat)
    def connection_lost(self, exc):
        if self in clients:
            clients.discard(self)
            log.write("ended %.6f\n" % time.monotonic())
        if self.timer is not None:
            self.timer.cancel()

def changed():
    global position
    try:
        os.read(ifd, 65536)
    except BlockingIOError:
        pass
    with open(path, "rb") as f:
        f.seek(position)
        data = f.read()
    position += len(data)
    for line in data.splitlines():
        event = b"data: %s\n\n" % line
        for client in clients:
            client.transport.write(event)

async def main():
    loop = asyncio.get_running_loop()
    loop.add_reader(ifd, changed)
    server = await loop.create_server(SSE, "127.0.0.1", port, backlog=4096)
    print("serving", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def rss_and_fds(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    if q == 50:
        return statistics.median(values)
    return values[min(len(values) - 1, int(len(values) * q / 100))]


def page_latencies(port, path, count=200):
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
                response.read()
            latencies.append(time.monotonic() - started)
        except OSError:
            pass
    return latencies


REFUSALS = collections.Counter()


def open_streams(port, path, count, first, headers=""):
    """Open ``count`` streams, BATCH at a time; (served sockets, refused)."""
    served, refused = [], 0
    for start in range(0, count, BATCH):
        pending = {}
        selector = selectors.DefaultSelector()
        for _ in range(min(BATCH, count - start)):
            try:
                sock = socket.create_connection((HOST, port), timeout=30)
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
            except OSError as error:
                REFUSALS[f"connect: {error.strerror}"] += 1
                refused += 1
                continue
            sock.setblocking(False)
            pending[sock] = b""
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                pending[sock] += data
                if first in pending[sock] or not data or b" 200 " not in pending[sock][:15]:
                    selector.unregister(sock)
                    if first in pending[sock]:
                        served.append(sock)
                    else:
                        REFUSALS[pending[sock][:12].decode("latin-1") or "closed"] += 1
                        refused += 1
                        sock.close()
                    del pending[sock]
        for sock in pending:
            REFUSALS["no first event within 60 s"] += 1
            refused += 1
            sock.close()
        selector.close()
    return served, refused


def fan_out(socks, log_path, marker):
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
        try:  # what arrived before (heartbeats) does not count
            while sock.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass
    with open(log_path, "a") as f:
        started = time.monotonic()
        f.write(f"{marker}\n")
    arrived = []
    deadline = time.monotonic() + 60
    while buffers and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            sock = key.fileobj
            try:
                buffers[sock] += sock.recv(65536)
            except (BlockingIOError, OSError):
                continue
            if marker.encode() in buffers[sock]:
                arrived.append(time.monotonic() - started)
                selector.unregister(sock)
                del buffers[sock]
    selector.close()
    return arrived, len(buffers)


def disconnect_times(socks, ended_log, pattern, repeats=20):
    times = []
    with open(ended_log, "rb") as f:
        for sock in socks[:repeats]:
            # Only what the server writes from now on is read: with 10,000
            # streams the log holds 10,000 "started" lines, and reading it
            # whole at every look took longer than the disconnect itself.
            f.seek(0, os.SEEK_END)
            seen = b""
            started = time.monotonic()
            sock.close()
            deadline = started + 10
            while time.monotonic() < deadline:
                seen += f.read()
                if pattern.encode() in seen:
                    times.append(time.monotonic() - started)
                    break
                time.sleep(0.0005)
    return times


def status(port):
    request = urllib.request.Request(
        f"http://{HOST}:{port}/@@stream-status?format=json", headers={"Authorization": AUTH}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


#: What the Zope server's clients ask for.
ZOPE_PATH = "/@@stream-log?log=app&format=sse"
ZOPE_HEADERS = f"Authorization: {AUTH}\r\n"


def zope_instance(port, count, settings_extra=""):
    """The benchmark's Zope instance for ``count`` streams:
    (instance, the followed log's path, the environment for runwsgi).
    ``settings_extra``: code appended to its settings module."""
    instance = ZopeInstance(
        port,
        server_options={"asyncore_use_poll": "true", "connection_limit": count + 200},
        stream_log=True,
    )
    home = instance.home
    with open(os.path.join(home, "etc", "site.zcml"), "w") as f:
        f.write(SITE_ZCML)
    # Not the event log: waitress writes "Task queue depth" warnings there
    # while it is busy (opening thousands of streams), and every line would
    # wake every stream (README: Deployment).
    log_path = os.path.join(home, "var", "app.log")
    with open(os.path.join(home, "benchsettings.py"), "w") as f:
        f.write(SETTINGS_MODULE.format(log=log_path) + settings_extra)
    from Zope2.utilities.mkwsgiinstance import write_inituser

    write_inituser(os.path.join(home, "inituser"), "admin", "admin")
    for path in (log_path, instance.stream_log):
        open(path, "a").close()
    env = {**os.environ, **instance.env}
    env["PYTHONPATH"] = os.pathsep.join((home, env["PYTHONPATH"]))
    return instance, log_path, env


def start_zope(instance, env):
    """runwsgi serving ``instance`` (from ``zope_instance``)."""
    return subprocess.Popen(
        [executable("runwsgi"), instance.zope_ini],
        env=env,
        cwd=instance.home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_server(kind, port, connections):
    """A serving Zope (``kind`` "zope") or asyncio server on ``port``:
    ``(process, followed log, SSE path, request headers, cleanup)``.  The
    Zope's ``connection_limit`` is ``connections``."""
    if kind == "zope":
        instance, log_path, env = zope_instance(port, connections)
        process = start_zope(instance, env)
        wait_until_serving(port, process)
        return process, log_path, ZOPE_PATH, ZOPE_HEADERS, instance.remove
    home = tempfile.mkdtemp(prefix="streamguard-asyncio-")
    log_path = os.path.join(home, "app.log")
    open(log_path, "a").close()
    process = subprocess.Popen(
        [sys.executable, "-c", ASYNCIO_SERVER, log_path, str(port), os.devnull],
        stdout=subprocess.PIPE,
    )
    process.stdout.readline()
    return process, log_path, "/events", "", lambda: subprocess.run(["rm", "-rf", home])


def measure(kind, count, fan_outs=5):
    port = free_port()
    if kind == "zope":
        instance, log_path, env = zope_instance(port, count)
        home = instance.home
        ended_log, pattern = instance.stream_log, "ended (client gone)"
        process = start_zope(instance, env)
        path, first, headers = ZOPE_PATH, b"retry:", ZOPE_HEADERS
        page = "/"
        cleanup = instance.remove
    else:
        home = tempfile.mkdtemp(prefix="streamguard-asyncio-")
        log_path = os.path.join(home, "app.log")
        ended_log, pattern = os.path.join(home, "ended.log"), "ended"
        open(log_path, "a").close()
        open(ended_log, "a").close()
        process = subprocess.Popen(
            [sys.executable, "-c", ASYNCIO_SERVER, log_path, str(port), ended_log],
            stdout=subprocess.PIPE,
        )
        process.stdout.readline()
        path, first, headers, page = "/events", b"retry:", "", "/"
        cleanup = lambda: subprocess.run(["rm", "-rf", home])  # noqa: E731
    try:
        if kind == "zope":
            wait_until_serving(port, process)
        page_latencies(port, page, 20)  # warm up
        idle_pages = page_latencies(port, page)
        rss0, fds0 = rss_and_fds(process.pid)
        socks, refused = open_streams(port, path, count, first, headers)
        held = "-"
        if kind == "zope":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                data = status(port)
                if data["parked"] >= len(socks):
                    break
                time.sleep(0.5)
            held = data["holding_a_thread"]
        time.sleep(2)
        rss1, fds1 = rss_and_fds(process.pid)
        cpu0, t0 = cpu_seconds(process.pid), time.monotonic()
        time.sleep(15)
        cpu = (cpu_seconds(process.pid) - cpu0) / (time.monotonic() - t0)
        busy_pages = page_latencies(port, page)
        rounds = []
        for _ in range(fan_outs):
            arrived, missing = fan_out(socks, log_path, f"fan-out marker {time.time()}")
            rounds.append((percentile(arrived, 50), percentile(arrived, 99), missing))
        gone = disconnect_times(socks, ended_log, pattern)
        for sock in socks:
            sock.close()
        served = len(socks) or 1
        return {
            "served": len(socks),
            "refused": refused,
            "held": held,
            "page0": (percentile(idle_pages, 50), percentile(idle_pages, 99)),
            "pageN": (percentile(busy_pages, 50), percentile(busy_pages, 99)),
            "rss": (rss1 - rss0) / served,
            "fds": (fds1 - fds0) / served,
            "cpu": cpu,
            "fan": (
                statistics.median(r[0] for r in rounds),
                statistics.median(r[1] for r in rounds),
                sum(r[2] for r in rounds),
            ),
            "gone": percentile(gone, 50),
        }
    finally:
        process.kill()
        process.wait(10)
        cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="100,1000,5000,10000")
    parser.add_argument("--servers", default="zope,asyncio")
    parser.add_argument("--fan-outs", type=int, default=5, help="fan-out rounds (median)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# open-files limit {hard}; runwsgi + waitress 4 threads vs asyncio (stdlib)")
    header = (
        f"{'server':<8} {'N':>6} {'served':>6} {'refused':>7} {'threads':>7} "
        f"{'page p50/p99 ms (0)':>19} {'page p50/p99 ms (N)':>19} {'KiB/str':>7} "
        f"{'fds/str':>7} {'CPU %':>6} {'fan-out p50/p99 ms':>18} {'lost':>4} {'gone ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for count in (int(c) for c in args.counts.split(",")):
        if count + FDS_KEPT > hard:  # the server's sockets, and ours
            print(f"# N={count} skipped: the open-files limit is {hard}")
            continue
        results = {}
        for kind in args.servers.split(","):
            r = results[kind] = measure(kind, count, args.fan_outs)
            print(
                f"{kind:<8} {count:>6} {r['served']:>6} {r['refused']:>7} {r['held']!s:>7} "
                f"{r['page0'][0] * 1000:>9.1f}/{r['page0'][1] * 1000:<9.1f} "
                f"{r['pageN'][0] * 1000:>9.1f}/{r['pageN'][1] * 1000:<9.1f} "
                f"{r['rss'] / 1024:>7.1f} {r['fds']:>7.2f} {r['cpu'] * 100:>6.1f} "
                f"{r['fan'][0] * 1000:>8.1f}/{r['fan'][1] * 1000:<9.1f} {r['fan'][2]:>4} "
                f"{r['gone'] * 1000:>7.2f}",
                flush=True,
            )
            if REFUSALS:
                print(f"# {kind} N={count} refused: {dict(REFUSALS)}", flush=True)
                REFUSALS.clear()
        if "zope" in results and "asyncio" in results:
            print(f"# N={count} zope / asyncio: {ratios(results['zope'], results['asyncio'])}")


def ratios(ours, theirs):
    def ratio(a, b):
        return f"{a / b:.1f}x" if b else "-"

    return ", ".join(
        (
            f"page p50 {ratio(ours['pageN'][0], theirs['pageN'][0])}",
            f"KiB/stream {ratio(ours['rss'], theirs['rss'])}",
            f"fds/stream {ratio(ours['fds'], theirs['fds'])}",
            f"CPU {ratio(ours['cpu'], theirs['cpu'])}",
            f"fan-out p50 {ratio(ours['fan'][0], theirs['fan'][0])}",
            f"fan-out p99 {ratio(ours['fan'][1], theirs['fan'][1])}",
            f"disconnect {ratio(ours['gone'], theirs['gone'])}",
        )
    )


if __name__ == "__main__":
    main()
