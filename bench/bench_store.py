"""Feature-store throughput against same-run baselines: memcpy, loopback socket, pickle.

Run: ``.venv/bin/python bench/bench_store.py [--sizes-mib 1 16 64 256] [--repeats 3]``.
Starts its own mooncake_master. The writer (this process) owns the segment; reads run in a
second process, so they cross a real loopback TCP connection like a trainer on another node.
Prints GB/s (best of ``--repeats`` after one warm-up) and ratios, plus peak RSS of each process.
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.api import common_pb2  # noqa: E402
from services.store import FeatureStore, open_store  # noqa: E402
from services.store.mooncake_proc import start_master  # noqa: E402
from services.tensors import checksum  # noqa: E402

MiB = 1 << 20


def best_gbps(nbytes: int, fn: Callable[[], object], repeats: int) -> float:
    """Best time of at least ``repeats`` runs (more for small sizes, ~0.3 s in all)."""
    fn()  # warm-up: first touch of pages, connections, caches
    best = float("inf")
    runs = 0
    spent = 0.0
    while runs < repeats or (spent < 0.3 and runs < 200):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best = min(best, took)
        spent += took
        runs += 1
    return nbytes / best / 1e9


def peak_rss_mib() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak over fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def socket_stream(port: int, nbytes: int, repeats: int) -> float:
    """Receive ``nbytes`` per round from the parent's sender into one preallocated buffer."""
    dest = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(dest.numpy())
    with socket.create_connection(("127.0.0.1", port)) as conn:
        def one() -> None:
            conn.sendall(b"g")
            got = 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
        return best_gbps(nbytes, one, repeats)


def serve_socket(listener: socket.socket, source: torch.Tensor) -> None:
    """Send the whole tensor each time the reader asks, until it hangs up."""
    conn, _ = listener.accept()
    data = memoryview(source.numpy())
    with conn:
        while conn.recv(1):
            conn.sendall(data)


def measure_reads(
    store: FeatureStore, plain: FeatureStore, raw: object, job: dict, repeats: int
) -> dict:
    spec = common_pb2.TensorSpec.FromString(bytes.fromhex(job["spec"]))
    out = {spec.name: torch.empty(spec.nbytes, dtype=torch.uint8)}
    return {
        "store_read": best_gbps(spec.nbytes, lambda: store.get_sample([spec], out), repeats),
        "store_read_noverify": best_gbps(
            spec.nbytes, lambda: plain.get_sample([spec], out), repeats),
        "raw": best_gbps(
            spec.nbytes, lambda: raw.get_into(spec.key, out[spec.name].data_ptr(), spec.nbytes),
            repeats),
        "socket": socket_stream(job["port"], spec.nbytes, repeats),
    }


def measure_local(store: FeatureStore, size: int, src: torch.Tensor, repeats: int) -> dict:
    n = src.numel()
    dst = torch.empty_like(src)
    registered = store.empty((n,), torch.uint8)  # type: ignore[attr-defined]
    registered.copy_(src)
    view = memoryview(src.numpy())
    return {
        "memcpy": best_gbps(n, lambda: dst.copy_(src), repeats),
        "checksum": best_gbps(n, lambda: checksum(view), repeats),
        "pickle": best_gbps(n, lambda: pickle.loads(pickle.dumps(src)), repeats),
        "store_write_registered": best_gbps(
            n, lambda: store.put_sample("r", f"w{size}", 0, {"x": registered}), repeats),
        "store_write_staged": best_gbps(
            n, lambda: store.put_sample("r", f"s{size}", 0, {"x": src}), repeats),
    }


def reader(url: str, repeats: int) -> None:
    """Child process: read each sample through the store, then the socket baseline."""
    jobs = json.loads(sys.stdin.readline())
    store = open_store(url)
    plain = open_store(url + "&verify=0")
    # Mooncake's own client, for how much of the read time is Mooncake's transfer itself.
    from mooncake.store import MooncakeDistributedStore

    raw = MooncakeDistributedStore()
    raw.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 * MiB, "tcp", "", url.split("/")[2].split("?")[0])
    results = {}
    for job in jobs:
        results[job["size"]] = measure_reads(store, plain, raw, job, repeats)
    results["peak_rss_mib"] = peak_rss_mib()  # type: ignore[assignment]
    print(json.dumps(results), flush=True)
    store.close()
    plain.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        reader(args.child, args.repeats)
        return

    master = start_master()
    biggest = max(args.sizes_mib)
    segment = max(64, 3 * sum(args.sizes_mib) + 64)
    store = open_store(master.url("bench", segment_mb=segment, buffer_mb=2 * biggest + 16))
    rows: dict[int, dict[str, float]] = {}
    jobs = []
    socket_threads = []
    for size in args.sizes_mib:
        src = torch.randint(0, 256, (size * MiB,), dtype=torch.uint8)
        rows[size] = measure_local(store, size, src, args.repeats)
        specs = store.put_sample("r", f"read{size}", 0, {"x": src})
        listener = socket.create_server(("127.0.0.1", 0))
        thread = threading.Thread(
            target=serve_socket, args=(listener, src), daemon=True)
        thread.start()
        socket_threads.append((thread, listener))
        jobs.append({"size": size, "spec": specs[0].SerializeToString().hex(),
                     "port": listener.getsockname()[1]})
    child = subprocess.run(
        [sys.executable, __file__, "--child", master.url("bench", buffer_mb=16),
         "--repeats", str(args.repeats)],
        input=json.dumps(jobs) + "\n", capture_output=True, text=True, timeout=900,
    )
    if child.returncode != 0:
        sys.exit(child.stderr[-3000:])
    read = json.loads(child.stdout.strip().splitlines()[-1])
    for size in args.sizes_mib:
        rows[size].update(read[str(size)])
    writer_rss = peak_rss_mib()
    store.close()
    master.stop()

    print("GB/s, best run after a warm-up. write: put_sample from registered memory into the "
          "writer's own segment (wstaged: from ordinary memory, one staging copy); xxh3: the "
          "XXH3-64 checksum alone, which every write pays."
          " read: get_sample in another process over "
          "loopback TCP with checksum check (read-nv: without); raw: Mooncake's get_into alone.")
    print(f"{'MiB':>5} {'memcpy':>7} {'xxh3':>6} {'socket':>7} {'pickle':>7} | {'write':>6} "
          f"{'w/memcpy':>8} {'wstaged':>7} | {'read':>6} {'r/sock':>6} {'read-nv':>7} "
          f"{'nv/sock':>7} {'raw':>6} {'raw/sock':>8} {'r/pickle':>8}")
    for size, r in rows.items():
        print(f"{size:>5} {r['memcpy']:>7.2f} {r['checksum']:>6.2f} {r['socket']:>7.2f} "
              f"{r['pickle']:>7.2f} | {r['store_write_registered']:>6.2f} "
              f"{r['store_write_registered'] / r['memcpy']:>8.2f} "
              f"{r['store_write_staged']:>7.2f} | {r['store_read']:>6.2f} "
              f"{r['store_read'] / r['socket']:>6.2f} {r['store_read_noverify']:>7.2f} "
              f"{r['store_read_noverify'] / r['socket']:>7.2f} {r['raw']:>6.2f} "
              f"{r['raw'] / r['socket']:>8.2f} {r['store_read'] / r['pickle']:>8.2f}")
    total = sum(args.sizes_mib)
    print(f"peak RSS: writer {writer_rss:.0f} MiB (segment {segment} MiB + registered buffer "
          f"{2 * biggest + 16} MiB + sources {2 * total} MiB), reader {read['peak_rss_mib']:.0f} "
          f"MiB (largest tensor {biggest} MiB)")


if __name__ == "__main__":
    main()
