"""Catch-up throughput: following a large log from its start.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_follow_throughput.py [--size 1GiB]

A log of ``--size`` bytes (default 1 GiB) of log lines (40-200 bytes, ASCII
with some UTF-8) is generated in a temporary directory and read once, so
every measurement below reads from the page cache.  Then, each ``--runs``
times (default 3), alternating:

- ``LogFollower.read()`` loop alone: ``LogFollower(path, offset=0)``, read
  until the offset reaches the size (decoded text, nothing sent);
- over HTTP through a real waitress (a subprocess running this script with
  ``--serve``, ``waitress.create_server`` with its defaults: 4 threads, 1 MB
  ``outbuf_overflow``), on loopback, read by a raw socket client that
  discards what it receives (``recv_into`` a 1 MiB buffer):

  (a) a WSGI app streaming ``LogFollower`` pieces, each encoded to UTF-8
      bytes (``piece.text.encode()``), until it reaches the size the file had
      when the request came (no Content-Length: chunked, as a live log is);
  (a') the same, yielding ``piece.data`` (the file's own bytes where they
      are valid UTF-8: no re-encoding);
  (c) for reference, the ceiling of waitress' app_iter path: the same app
      yielding raw 64 KiB ``os.pread`` blocks, no follower at all;
  (b) the same file as ``environ['wsgi.file_wrapper'](file)`` with a
      Content-Length (waitress sends it from the file in its I/O thread).

MB/s is file bytes (10^6) per second, from sending the request to the
server's close.  Cells are the median of the runs (best in brackets).  The
issue's target: (a)/(b) >= 0.8.  Nothing is asserted.
"""

import argparse
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

from collective.streamguard.follow import LogFollower


UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
UNITS.update(k=10**3, m=10**6, g=10**9, kib=2**10, mib=2**20, gib=2**30)


def parse_size(text):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def generate(path, size):
    rng = random.Random(1)
    levels = ["INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR"]
    words = "request user catalog reindex größe portal_catalog waitress ZODB".split()
    lines = []
    for n in range(40_000):
        message = " ".join(rng.choice(words) for _ in range(rng.randint(2, 25)))
        lines.append(
            f"2026-11-21 00:{n // 600 % 60:02d}:{n // 10 % 60:02d},{n % 1000:03d} "
            f"{rng.choice(levels)} [Zope.SiteErrorLog:{n % 400}] {message}\n"
        )
    block = "".join(lines).encode("utf-8")
    with open(path, "wb") as file:
        written = 0
        while written < size:
            chunk = block[: size - written]
            file.write(chunk)
            written += len(chunk)


def warm(path):
    with open(path, "rb", buffering=0) as file:
        buffer = bytearray(1 << 20)
        while file.readinto(buffer):
            pass


def follower_alone(path):
    start = time.monotonic()
    with LogFollower(path, offset=0) as follower:
        size = follower.size
        while follower.offset < size:
            follower.read()
    return size / (time.monotonic() - start)


# -- the server side ----------------------------------------------------------


def make_app(path):
    def app(environ, start_response):
        target = environ["PATH_INFO"]
        if target in ("/text", "/data"):
            follower = LogFollower(path, offset=0)
            follower.open()
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return stream(follower, target == "/data")
        if target == "/raw":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return raw(path)
        file = open(path, "rb")
        size = os.fstat(file.fileno()).st_size
        start_response(
            "200 OK",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(size)),
            ],
        )
        return environ["wsgi.file_wrapper"](file)

    return app


def stream(follower, data):
    try:
        size = follower.size
        while follower.offset < size:
            for piece in follower.read():
                yield piece.data if data else piece.text.encode("utf-8")
    finally:
        follower.close()


def raw(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        size, position = os.fstat(fd).st_size, 0
        while position < size:
            block = os.pread(fd, 65536, position)
            position += len(block)
            yield block
    finally:
        os.close(fd)


def serve(path):
    import waitress

    server = waitress.create_server(make_app(path), host="127.0.0.1", port=0)
    print(server.effective_port, flush=True)
    server.run()


# -- the client side ----------------------------------------------------------


def fetch(port, target, size):
    """Seconds to receive the whole response to ``GET target``; bytes read."""
    buffer = bytearray(1 << 20)
    received = 0
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        request = f"GET {target} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        while n := sock.recv_into(buffer):
            received += n
    elapsed = time.monotonic() - start
    if received < size:
        raise RuntimeError(f"{target}: {received} bytes for a {size}-byte file")
    return elapsed, received


ROWS = {
    "alone": "LogFollower.read() loop alone",
    "text": "(a) waitress, LogFollower pieces, piece.text.encode()",
    "data": "(a') waitress, LogFollower pieces, piece.data",
    "raw": "(c) waitress, raw 64 KiB pread blocks, no follower",
    "file": "(b) waitress, wsgi.file_wrapper",
}


def cell(rates):
    return f"{statistics.median(rates) / 1e6:8.0f} MB/s ({max(rates) / 1e6:.0f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=parse_size, default=2**30, help="e.g. 1GiB (default), 200MB"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "event.log")
        start = time.monotonic()
        generate(path, args.size)
        warm(path)
        size = os.path.getsize(path)
        print(
            f"Python {platform.python_version()}, waitress {version('waitress')}, "
            f"Linux {platform.release()}, {os.cpu_count()} CPUs, loopback"
        )
        print(
            f"Log of {size:,} bytes in {directory} (generated and cached in "
            f"{time.monotonic() - start:.1f} s); median of {args.runs} runs (best):"
        )
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", path],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        try:
            port = int(server.stdout.readline())
            rates = {name: [] for name in ROWS}
            for _ in range(args.runs):
                rates["alone"].append(follower_alone(path))
                for name in list(ROWS)[1:]:
                    elapsed, received = fetch(port, f"/{name}", size)
                    rates[name].append(size / elapsed)
                    if name == "text":
                        wire = received
        finally:
            server.terminate()
            server.wait()
    header = f"{'reader':<58} {'throughput':>22}"
    print(header)
    print("-" * len(header))
    for name, label in ROWS.items():
        print(f"{label:<58} {cell(rates[name]):>22}")
    file_rate = statistics.median(rates["file"])
    for name in ("text", "data", "raw"):
        ratio = statistics.median(rates[name]) / file_rate
        print(f"ratio {ROWS[name].split()[0]}/(b) of the medians: {ratio:.2f}")
    print("(the issue's target: (a)/(b) >= 0.8)")
    print(f"(a) sent {wire:,} bytes for {size:,} file bytes (chunked framing)")


if __name__ == "__main__":
    main()
