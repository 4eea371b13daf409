"""How long a stream runs on after its client has gone.

Run from the repository root with the venv that has waitress:

    PYTHONPATH=src /tmp/pinvenv/bin/python benchmarks/bench_disconnect_latency.py

A real waitress (subprocess, threads=4, loopback) serves the test app of
``collective.streamguard.tests.wsgiapps``; a raw-socket client opens a
stream, waits until the app is inside it, then closes the socket.  Latency
is the time from the client's ``close()`` to the moment the server side
knows, measured on CLOCK_MONOTONIC (shared by all processes on Linux): the
app reports ``time.monotonic()`` over a unix datagram socket.

Three ways of knowing, side by side in one run:

- streamguard: ``wait_closed()``, on waitress' default
  ``channel_request_lookahead = 0`` and on 1; streams one at a time;
- waitress' own ``environ['waitress.client_disconnected']``, which needs
  ``channel_request_lookahead = 1``, polled once a second (the closes come at
  a random phase of the poll); four streams at a time;
- naive: write a chunk every second and stop when waitress raises on the
  dead client (it then closes the iterator); four streams at a time.

Nothing is asserted; targets from the issue: median <= 1 ms, p99 <= 20 ms.
"""

import argparse
import os
import platform
import random
import statistics
import tempfile
import threading
import time
import uuid

from collective.streamguard.tests import servers


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Bench:
    def __init__(self, lookahead):
        self.directory = tempfile.mkdtemp(prefix="sg-bench-")
        self.sink = servers.EventSink(self.directory)
        self.server = servers.Server(
            "waitress",
            options={"threads": 4, "channel_request_lookahead": lookahead},
            env=self.sink.env,
            directory=self.directory,
        ).start()
        self.lock = threading.Lock()

    def close(self):
        self.server.cleanup()
        self.sink.close()

    def open_stream(self, mode, timeout):
        rid = uuid.uuid4().hex[:12]
        sock = servers.connect(self.server)
        sock.sendall(servers.request_bytes(f"/stream?id={rid}&mode={mode}&timeout={timeout}"))
        servers.read_until(sock, b"ready\n")
        return rid, sock

    def streamguard(self, count):
        """One stream at a time: the app sits in wait_closed(30)."""
        latencies = []
        for _ in range(count):
            rid, sock = self.open_stream("wait", 30)
            self.sink.wait_for(event="start", id=rid)
            time.sleep(0.005)  # let the worker get into wait_closed()
            left_at = time.monotonic()
            sock.close()
            waited = self.sink.wait_for(event="waited", id=rid, timeout=60)
            assert waited["left"], waited
            latencies.append(waited["t"] - left_at)
            self.sink.wait_for(event="end", id=rid, timeout=60)
        return latencies

    def concurrent(self, count, mode, event, drain=False):
        """Four client threads (waitress has four workers); each opens a
        stream, waits a random 0-1 s, closes.  The main thread collects."""
        closed_at = {}
        ids = iter(range(count))
        errors = []

        def client():
            while True:
                with self.lock:
                    if next(ids, None) is None:
                        return
                try:
                    rid, sock = self.open_stream(mode, 1.0)
                    time.sleep(random.random())
                    if drain:
                        # Unread bytes in the receive buffer turn close()
                        # into an RST; read the chunks first so it is a FIN.
                        sock.setblocking(False)
                        try:
                            while sock.recv(65536):
                                pass
                        except BlockingIOError:
                            pass
                    with self.lock:
                        closed_at[rid] = time.monotonic()
                    sock.close()
                except Exception as exc:  # pragma: no cover
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        latencies = {}
        deadline = time.monotonic() + 60 + count * 5
        while (len(latencies) < count or any(t.is_alive() for t in threads)) and not errors:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: only {len(latencies)} of {count} streams ended")
            for found in self.sink.collect(event=event):
                latencies[found["id"]] = found["t"]
            time.sleep(0.01)
        for thread in threads:
            thread.join(10)
        if errors:
            raise errors[0]
        with self.lock:
            return [latencies[rid] - closed_at[rid] for rid in closed_at]


def row(name, streams, latencies):
    cells = (statistics.median(latencies), percentile(latencies, 0.99), max(latencies))
    return f"{name:52} {streams:>7} " + " ".join(f"{fmt(c):>10}" for c in cells)


def fmt(seconds):
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.3f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--flag-streams", type=int, default=40)
    parser.add_argument("--write-streams", type=int, default=20)
    args = parser.parse_args()
    random.seed(1)

    rows = []
    bench = Bench(lookahead=0)
    try:
        latencies = bench.streamguard(args.streams)
        rows.append(row("streamguard wait_closed(), lookahead 0", args.streams, latencies))
        latencies = bench.concurrent(args.write_streams, "write", "end", drain=True)
        rows.append(
            row(
                "naive: a chunk every 1 s until a write fails",
                args.write_streams,
                latencies,
            )
        )
    finally:
        bench.close()
    bench = Bench(lookahead=1)
    try:
        latencies = bench.streamguard(args.streams)
        rows.append(row("streamguard wait_closed(), lookahead 1", args.streams, latencies))
        latencies = bench.concurrent(args.flag_streams, "flag", "flagged")
        rows.append(
            row(
                "waitress.client_disconnected, lookahead 1, 1 s poll",
                args.flag_streams,
                latencies,
            )
        )
    finally:
        bench.close()

    from importlib.metadata import version

    print(
        f"Python {platform.python_version()}, waitress {version('waitress')} "
        f"(threads=4), {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, loopback"
    )
    print(
        "Time from the client's close() to the server side knowing "
        "(p99 of 20 or 40 samples is their maximum):"
    )
    header = f"{'method':52} {'streams':>7} {'median':>10} {'p99':>10} {'max':>10}"
    print(header)
    print("-" * len(header))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
