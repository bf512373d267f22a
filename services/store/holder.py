"""A process that contributes memory to the Mooncake pool and holds it until SIGTERM.

Run ``python -m services.store.holder --master HOST:PORT --segment-mb N``. Writers that store
into a holder's segment (``placement=any`` or no segment of their own) can exit without
losing their samples.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from services.store.mooncake import MiB, master_reachable


def main(argv: list[str] | None = None) -> int:
    """Mount the segment, print ``ready SEGMENT``, and sleep until SIGTERM or SIGINT."""
    from mooncake.store import MooncakeDistributedStore

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--master", required=True, help="master RPC address HOST:PORT")
    parser.add_argument("--segment-mb", type=int, required=True, help="memory to lend, MiB")
    parser.add_argument("--local", default="127.0.0.1", help="address peers reach us at")
    parser.add_argument("--metadata", default="P2PHANDSHAKE")
    parser.add_argument("--protocol", default="tcp")
    parser.add_argument("--device", default="")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # setup() retries for a long time when the master is down: fail fast instead.
    if not master_reachable(args.master, 5.0):
        print(f"Mooncake master {args.master} refuses connections; start mooncake_master "
              "or fix --master", file=sys.stderr)
        return 1
    client = MooncakeDistributedStore()
    rc = client.setup(args.local, args.metadata, args.segment_mb * MiB, 16 * MiB,
                      args.protocol, args.device, args.master)
    if rc != 0:
        print(f"failed to join {args.master}: {rc}", file=sys.stderr)
        return 1
    print(f"ready {client.get_hostname()}", flush=True)
    stop.wait()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
