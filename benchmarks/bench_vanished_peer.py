"""How long an idle stream lives after its client vanished without FIN or reset.

A real waitress in this process serves an idle guarded stream (it sends
nothing) on one end of a veth pair; the client runs in a network namespace
at the other end (``ip netns``: run as root).  The client's link is then
taken down: no FIN, no reset, no packet ever again, as when a laptop
sleeps.  Measured: the time from the link going down to the stream's end,
with the keepalive settings the guard puts on every stream socket
(``collective.streamguard.connection.KEEPALIVE_*``, ``USER_TIMEOUT_MS``),
and the reason it ended with.  Without them the stream would live until
``max_duration``.

Run from the repository root, as root::

    .venv/bin/python benchmarks/bench_vanished_peer.py --runs 3
"""

import argparse
import statistics
import time

from collective.streamguard import connection
from collective.streamguard.tests import test_vanished_peer
from collective.streamguard.tests.helpers import wait_for


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    layer = test_vanished_peer.ClientNamespaceLayer
    layer.setUp()
    results = []
    try:
        for _ in range(args.runs):
            case = test_vanished_peer.TestVanishedPeer(
                "test_every_stream_socket_gets_keepalive_within_a_minute"
            )
            case.setUp()
            try:
                case.start_client()
                assert wait_for(lambda case=case: case.app.options)
                down = time.monotonic()
                layer.client_link("down")
                assert wait_for(lambda case=case: case.app.ended, timeout=600)
                results.append((time.monotonic() - down, case.app.ended[0]))
            finally:
                case.doCleanups()
    finally:
        layer.tearDown()
    print(
        f"# keepalive idle {connection.KEEPALIVE_IDLE} s, interval "
        f"{connection.KEEPALIVE_INTERVAL} s, count {connection.KEEPALIVE_COUNT}, "
        f"TCP_USER_TIMEOUT {connection.USER_TIMEOUT_MS} ms; {args.runs} runs"
    )
    print(f"{'run':>4} {'ended after s':>14}  reason")
    for number, (seconds, reason) in enumerate(results, 1):
        print(f"{number:>4} {seconds:>14.1f}  {reason}")
    print(f"median {statistics.median(s for s, _ in results):.1f} s")


if __name__ == "__main__":
    main()
