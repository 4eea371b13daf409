"""A burst of simultaneous SSE opens on a real Zope, next to asyncio.

What happens when an instance restarts with N viewers open: every
EventSource comes back at once.  For each N, on one fresh server:

- the burst: N connections opened at once, each asking for
  ``@@stream-log?log=app&format=sse``; the time until every one has its
  first event (``retry:``) or its refusal, and how many were served,
  refused (503 with ``Retry-After``: the admission limit) or lost;
- the same N connections at once asking for ``@@stream-log?log=nope`` (the
  same view, answered 404 with no stream): the floor a burst is compared
  with (goal: the burst within 2x of it);
- the same burst again alone ("alone": no page loop, as the floor is
  measured), after the first burst's streams have ended.  The burst with
  pages runs after it: every page served during it (pages go first,
  ``waitress.admission``) is worker time the burst waits for, so it is
  not the floor's like; the floor is therefore also timed with the same
  page loop running ("404+p s"), last.  "ratio" is burst/404+p and
  alone/404: each with its like;
- pages during the burst: a loop of ``/`` requests, one after the other, in
  its own thread from before the burst until it is served; p50/p99/max,
  and the ratio of p50 and p99 to the same page with no burst (goal: p99
  under 1 s at N = 1,000).

Side by side, the stdlib asyncio SSE server of ``bench_parked_streams.py``
(same page loop, burst on its ``/events``; it has no 404 view).

The Zope server is the one of ``bench_parked_streams.py``: ``runwsgi``,
waitress with 4 threads, ``asyncore_use_poll``, a throw-away FileStorage
instance with the add-on.  Run from the repository root, after
``make install-test``, with nothing else busy on the machine::

    .venv/bin/python benchmarks/bench_arrivals.py [--counts 500,1000,2000]

Nothing is asserted.
"""

import argparse
import os
import platform
import resource
import selectors
import socket
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_parked_streams import FDS_KEPT  # noqa: E402
from bench_parked_streams import HOST  # noqa: E402
from bench_parked_streams import cpu_seconds  # noqa: E402
from bench_parked_streams import free_port  # noqa: E402
from bench_parked_streams import page_latencies  # noqa: E402
from bench_parked_streams import percentile  # noqa: E402
from bench_parked_streams import start_server  # noqa: E402
from bench_parked_streams import status  # noqa: E402


class PageLoop(threading.Thread):
    """``GET page`` one after the other until stopped; latencies, failures."""

    def __init__(self, port, page):
        super().__init__(daemon=True)
        self.url = f"http://{HOST}:{port}{page}"
        self.latencies, self.failures = [], 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=120) as response:
                    response.read()
                self.latencies.append(time.monotonic() - started)
            except OSError:
                self.failures += 1

    def stop(self):
        self.stopping.set()
        self.join(130)


def burst(port, path, count, headers, done):
    """Open ``count`` connections at once; (seconds, served, refused, lost, socks).

    ``done(data)`` says, from what a connection has received so far, whether
    it is served (True), refused (False) or still pending (None)."""
    request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode()
    selector = selectors.DefaultSelector()
    pending, served, refused = {}, [], 0
    started = time.monotonic()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((HOST, port))
        except BlockingIOError:
            pass
        pending[sock] = b""
        selector.register(sock, selectors.EVENT_WRITE)
    sent = set()
    deadline = started + 300
    while pending and time.monotonic() < deadline:
        for key, _events in selector.select(1.0):
            sock = key.fileobj
            if sock not in sent:
                try:
                    sock.sendall(request)
                except OSError:
                    refused += 1
                    selector.unregister(sock)
                    del pending[sock]
                    sock.close()
                    continue
                sent.add(sock)
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            pending[sock] += data
            verdict = done(pending[sock]) if data else False
            if verdict is None:
                continue
            selector.unregister(sock)
            del pending[sock]
            if verdict:
                served.append(sock)
            else:
                refused += 1
                sock.close()
    elapsed = time.monotonic() - started
    for sock in pending:
        sock.close()
    selector.close()
    return elapsed, len(served), refused, len(pending), served


def first_event(data):
    if data[:12] not in (b"HTTP/1.1 200", b"HTTP/1.0 200") and b"\r\n\r\n" in data:
        return False
    return True if b"retry:" in data else None


def answered(data):
    return True if b"\r\n\r\n" in data else None


def wait_until_ended(kind, port, timeout=60):
    """Until the server has ended the streams whose clients closed (Zope:
    none live in ``@@stream-status``; asyncio ends them at once)."""
    if kind != "zope":
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while status(port)["live"] and time.monotonic() < deadline:
        time.sleep(0.2)


def measure(kind, count):
    port = free_port()
    process, log_path, path, headers, cleanup = start_server(kind, port, 2 * count)
    result = {}
    try:
        page_latencies(port, "/", 20)  # warm up
        result["idle"] = page_latencies(port, "/", 200)
        if kind == "zope":
            # The floor: the same view, answered at once with 404.
            cpu = cpu_seconds(process.pid)
            seconds, served, refused, lost, socks = burst(
                port, "/@@stream-log?log=nope", count, headers + "Connection: close\r\n", answered
            )
            result["floor_cpu"] = cpu_seconds(process.pid) - cpu
            for sock in socks:
                sock.close()
            result["floor"] = seconds
        # The burst alone, as the floor is measured (no page loop): pages
        # served in between take worker time from the burst below.
        seconds, *_counts, socks = burst(port, path, count, headers, first_event)
        result["alone"] = seconds
        for sock in socks:
            sock.close()
        wait_until_ended(kind, port)
        pages = PageLoop(port, "/")
        pages.start()
        while not pages.latencies:  # the loop runs before the burst starts
            time.sleep(0.01)
        cpu = cpu_seconds(process.pid)
        seconds, served, refused, lost, socks = burst(port, path, count, headers, first_event)
        result["cpu"] = cpu_seconds(process.pid) - cpu
        pages.stop()
        for sock in socks:
            sock.close()
        if kind == "zope":
            # The floor again, with the same page loop running: the like of
            # the burst above.
            wait_until_ended(kind, port)
            floor_pages = PageLoop(port, "/")
            floor_pages.start()
            while not floor_pages.latencies:
                time.sleep(0.01)
            floor_seconds, *_counts, floor_socks = burst(
                port, "/@@stream-log?log=nope", count, headers + "Connection: close\r\n", answered
            )
            floor_pages.stop()
            for sock in floor_socks:
                sock.close()
            result["floor_pages"] = floor_seconds
        result.update(
            seconds=seconds,
            served=served,
            refused=refused,
            lost=lost,
            pages=pages.latencies,
            failures=pages.failures,
        )
        return result
    finally:
        process.kill()
        process.wait(10)
        cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="500,1000,2000")
    parser.add_argument("--servers", default="zope,asyncio")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# open-files limit {hard}; runwsgi + waitress 4 threads vs asyncio (stdlib)")
    header = (
        f"{'server':<8} {'N':>5} {'burst s':>7} {'alone s':>7} {'404s s':>6} {'404+p s':>7} "
        f"{'ratio':>9} "
        f"{'served':>6} {'refused':>7} {'lost':>4} {'pages':>5} "
        f"{'page p50/p99/max ms (burst)':>28} {'page p50/p99 ms (0)':>19} "
        f"{'x p50/p99':>10} {'CPU ms/open':>11} {'404':>5}"
    )
    print(header)
    print("-" * len(header))
    for count in (int(c) for c in args.counts.split(",")):
        if count + FDS_KEPT > hard:
            print(f"# N={count} skipped: the open-files limit is {hard}")
            continue
        for kind in args.servers.split(","):
            r = measure(kind, count)
            p = r["pages"]
            i = r["idle"]
            floor = r.get("floor")
            floor_pages = r.get("floor_pages")
            ratios = "-"
            if floor is not None:
                ratios = f"{r['seconds'] / floor_pages:.1f}/{r['alone'] / floor:.1f}"
            print(
                f"{kind:<8} {count:>5} {r['seconds']:>7.2f} {r['alone']:>7.2f} "
                f"{floor if floor is None else format(floor, '.2f')!s:>6} "
                f"{floor_pages if floor_pages is None else format(floor_pages, '.2f')!s:>7} "
                f"{ratios:>9} "
                f"{r['served']:>6} {r['refused']:>7} {r['lost']:>4} {len(p):>5} "
                f"{percentile(p, 50) * 1000:>9.1f}/{percentile(p, 99) * 1000:<8.1f}/"
                f"{max(p) * 1000:<8.1f} "
                f"{percentile(i, 50) * 1000:>9.1f}/{percentile(i, 99) * 1000:<9.1f} "
                f"{percentile(p, 50) / percentile(i, 50):>4.1f}/"
                f"{percentile(p, 99) / percentile(i, 99):<5.1f} "
                f"{r['cpu'] * 1000 / count:>11.2f} "
                f"{'-' if floor is None else format(r['floor_cpu'] * 1000 / count, '.2f'):>5}",
                flush=True,
            )
            if r.get("failures"):
                print(f"# {kind} N={count}: {r['failures']} pages failed", flush=True)


if __name__ == "__main__":
    main()
