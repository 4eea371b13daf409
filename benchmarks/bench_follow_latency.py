"""How soon an appended log line reaches a LogFollower, next to GNU tail -F.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_follow_latency.py

A writer (the main thread) appends single lines to a log in a temporary
directory, one every 5-10 ms (random), each with ``os.write`` on an
``O_APPEND`` fd, and notes ``time.monotonic()`` just before the write.  Two
readers follow the same file in the same run, each in its own thread of this
process, and note ``time.monotonic()`` when a line has arrived:

- ``LogFollower`` woken as a producer is: by ``select.poll`` on ``fileno()``
  (first pass), or by ``StreamGuard.wait(poll_interval, readable=[fd])`` with
  a client that stays connected (second pass);
- GNU ``tail -F -n0`` on the same file, its stdout (a pipe) read by a thread
  with ``os.read``.

Latency is the time from just before the write to the reader's timestamp for
that line.  Both readers share the process' GIL with the writer, the same
way.  Nothing is asserted.
"""

import argparse
import os
import platform
import random
import select
import statistics
import subprocess
import tempfile
import threading
import time

from collective.streamguard.connection import ClientConnection
from collective.streamguard.guard import StreamGuard
from collective.streamguard.logs.follower import LogFollower
from collective.streamguard.streams import LiveStreams


class StaysOpen(ClientConnection):
    """A client that never leaves: the guard only waits on the log's fd."""

    probe = "bench"
    leaving = False

    def _probe(self):
        return self._closed if self.leaving else self._open


class Lines:
    """Complete ``line <n>`` lines out of a byte or text stream, timestamped."""

    def __init__(self):
        self.arrived = {}
        self.buffer = ""
        self.all_in = threading.Event()
        self.expected = None

    def feed(self, text, now):
        self.buffer += text
        *complete, self.buffer = self.buffer.split("\n")
        for line in complete:
            words = line.split()
            if len(words) >= 2 and words[0] == "line":
                self.arrived.setdefault(int(words[1]), now)
        if self.expected is not None and len(self.arrived) >= self.expected:
            self.all_in.set()


def follow_with_poll(follower, lines, stop_fd):
    poller = select.poll()
    poller.register(follower.fileno(), select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    while True:
        for piece in follower.read():
            lines.feed(piece.text, time.monotonic())
        events = poller.poll(follower.poll_interval * 1000)
        if any(fd == stop_fd for fd, _ in events):
            return


def follow_with_guard(follower, lines, guard):
    fd = follower.fileno()
    while True:
        for piece in follower.read():
            lines.feed(piece.text, time.monotonic())
        if guard.wait(follower.poll_interval, readable=[fd]):
            return


def read_tail(process, lines):
    fd = process.stdout.fileno()
    while data := os.read(fd, 65536):
        lines.feed(data.decode("utf-8", "replace"), time.monotonic())


def start_tail(path, writer_fd):
    """Start ``tail -F -n0`` and return once it shows appended lines."""
    process = subprocess.Popen(
        ["tail", "-F", "-n0", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    os.set_blocking(process.stdout.fileno(), False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        os.write(writer_fd, b"warm-up\n")
        if select.select([process.stdout], [], [], 0.1)[0]:
            time.sleep(0.1)
            try:
                while os.read(process.stdout.fileno(), 65536):
                    pass
            except BlockingIOError:
                pass
            os.set_blocking(process.stdout.fileno(), True)
            return process
    raise RuntimeError("tail -F did not start")


def run_pass(directory, mode, count, min_gap, max_gap):
    path = os.path.join(directory, f"{mode}.log")
    writer_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    tail = start_tail(path, writer_fd)
    follower = LogFollower(path)
    follower.open()
    ours, theirs = Lines(), Lines()
    ours.expected = theirs.expected = count
    stop_r, stop_w = os.pipe()
    client = StaysOpen()
    guard = StreamGuard(client, live_streams=LiveStreams())
    if mode == "poll":
        target, args = follow_with_poll, (follower, ours, stop_r)
    else:
        target, args = follow_with_guard, (follower, ours, guard)
    reader = threading.Thread(target=target, args=args)
    tail_reader = threading.Thread(target=read_tail, args=(tail, theirs))
    reader.start()
    tail_reader.start()
    time.sleep(0.2)

    sent = {}
    filler = "x" * 60
    for n in range(count):
        data = f"line {n} {filler}\n".encode()
        sent[n] = time.monotonic()
        os.write(writer_fd, data)
        time.sleep(random.uniform(min_gap, max_gap))
    ours.all_in.wait(5)
    theirs.all_in.wait(5)

    os.write(stop_w, b"x")
    client.leaving = True  # ends the guard's wait (the poll pass has its pipe)
    guard.wake()
    reader.join(5)
    tail.terminate()
    tail_reader.join(5)
    tail.wait()
    follower.close()
    for fd in (stop_r, stop_w, writer_fd):
        os.close(fd)
    return (
        [(ours.arrived[n] - sent[n]) * 1000 for n in sent if n in ours.arrived],
        [(theirs.arrived[n] - sent[n]) * 1000 for n in sent if n in theirs.arrived],
    )


def row(name, count, latencies):
    latencies = sorted(latencies)
    if not latencies:
        return f"{name:<44} {0:>5}/{count:<5} {'-':>10} {'-':>10} {'-':>10}"
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    median, worst = statistics.median(latencies), latencies[-1]
    return (
        f"{name:<44} {len(latencies):>5}/{count:<5} "
        f"{median:>7.3f} ms {p99:>7.3f} ms {worst:>7.3f} ms"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--min-gap", type=float, default=0.005, help="seconds")
    parser.add_argument("--max-gap", type=float, default=0.010, help="seconds")
    args = parser.parse_args()
    random.seed(1)
    tail_version = subprocess.run(
        ["tail", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    print(
        f"Python {platform.python_version()}, {tail_version}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs"
    )
    print(
        f"Latency from just before os.write() of one line to its arrival, "
        f"{args.lines} lines, one every {args.min_gap * 1000:g}-"
        f"{args.max_gap * 1000:g} ms:"
    )
    header = f"{'reader':<44} {'lines':>11} {'median':>10} {'p99':>10} {'max':>10}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as directory:
        for mode, name in (
            ("poll", "LogFollower, poll() on fileno()"),
            ("guard", "LogFollower, StreamGuard.wait(readable=[fd])"),
        ):
            ours, theirs = run_pass(directory, mode, args.lines, args.min_gap, args.max_gap)
            print(row(name, args.lines, ours))
            print(row("  GNU tail -F -n0, same file, same pass", args.lines, theirs))


if __name__ == "__main__":
    main()
