"""Normal pages during an abandon storm: guarded streams against a naive log loop.

A real Zope (``runwsgi``, waitress with 4 threads, a throw-away FileStorage
instance with the add-on and the test views) serves two kinds of stream:

- guarded: ``stream_response`` with a producer that waits in ``guard.idle()``;
- naive: a log loop that never asks for the client: a body iterator that yields a first
  line and then sleeps waiting for data that never comes, never asking
  whether the client is still there.

For each kind, a storm thread opens streams, reads the first line and
leaves, one after the other, while a poller thread requests a normal page
(``@@streamguard-test-mark``) in a loop with a 2 s timeout.  The table gives
the poller's latencies (median, p99 of the answered requests) and how many
normal requests failed or timed out.  Nothing is asserted.

Run from the repository root, after ``make test`` installed the venv::

    .venv/bin/python benchmarks/bench_abandon_storm.py [--streams 100] [--seconds 10]
"""

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from collective.streamguard.tests.servers import HOST  # noqa: E402
from collective.streamguard.tests.servers import executable  # noqa: E402
from collective.streamguard.tests.servers import free_port  # noqa: E402
from collective.streamguard.tests.test_shutdown import wait_until_serving  # noqa: E402
from collective.streamguard.tests.zopeinstance import ZopeInstance  # noqa: E402

PATHS = {
    "guarded": "/@@streamguard-test-stream?mode=idle&tag=storm{n}",
    "naive": "/@@streamguard-test-naive?n={n}",
}


def poll_pages(port, stop, latencies, failures):
    url = f"http://{HOST}:{port}/@@streamguard-test-mark"
    while not stop.is_set():
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                response.read()
            latencies.append(time.monotonic() - started)
        except OSError:
            failures.append(time.monotonic() - started)


def storm(port, path, count, seconds, outcome):
    interval = seconds / count
    for n in range(count):
        started = time.monotonic()
        try:
            # Short: a naive server with all threads held never answers.
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                sock.sendall(f"GET {path.format(n=n)} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                data = b""
                while b"first line" not in data and b" 503 " not in data[:20]:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            outcome["refused" if b" 503 " in data[:20] else "served"] += 1
        except OSError:
            outcome["not served"] += 1
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def run(kind, count, seconds):
    port = free_port()
    instance = ZopeInstance(port)
    process = subprocess.Popen(
        [executable("runwsgi"), instance.zope_ini],
        env={**os.environ, **instance.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(port, process)
        stop, latencies, failures = threading.Event(), [], []
        outcome = {"served": 0, "refused": 0, "not served": 0}
        poller = threading.Thread(target=poll_pages, args=(port, stop, latencies, failures))
        poller.start()
        storm(port, PATHS[kind], count, seconds, outcome)
        time.sleep(1)
        stop.set()
        poller.join(5)
        return outcome, latencies, failures
    finally:
        process.kill()
        process.wait(10)
        instance.remove()


def ms(values, q):
    if not values:
        return "-"
    values = sorted(values)
    if q == 50:
        return f"{statistics.median(values) * 1000:.1f}"
    return f"{values[min(len(values) - 1, int(len(values) * q / 100))] * 1000:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"# runwsgi + waitress, 4 threads; {args.streams} streams abandoned over "
        f"{args.seconds:.0f} s; normal page polled with a 2 s timeout"
    )
    header = (
        f"{'stream kind':<10} {'served':>7} {'refused':>8} {'not served':>11} "
        f"{'pages ok':>9} {'pages failed':>13} {'median ms':>10} {'p99 ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for kind in ("guarded", "naive"):
        outcome, latencies, failures = run(kind, args.streams, args.seconds)
        print(
            f"{kind:<10} {outcome['served']:>7} {outcome['refused']:>8} "
            f"{outcome['not served']:>11} {len(latencies):>9} {len(failures):>13} "
            f"{ms(latencies, 50):>10} {ms(latencies, 99):>8}"
        )


if __name__ == "__main__":
    main()
