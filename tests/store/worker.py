"""A feature-store client in its own OS process, driven by the process-level tests.

``write URL SAMPLE`` puts a deterministic sample, prints its specs (hex protobuf, comma separated)
and keeps its segment alive until stdin closes. ``read URL SPECS`` reads them back, checks every
byte and prints ``ok`` or ``ERR <error class> <message>``.
"""

from __future__ import annotations

import sys

import torch

from services.api import common_pb2
from services.store import StoreError, open_store


def sample(name: str) -> dict[str, torch.Tensor]:
    """The tensors of sample ``name``: the same on every call, different across names."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return {
        "hidden_state": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "input_ids": torch.randint(0, 1000, (32,), generator=g),
        "loss_mask": torch.randint(0, 2, (32,), generator=g).bool(),
    }


def encode(specs: list[common_pb2.TensorSpec]) -> str:
    return ",".join(s.SerializeToString().hex() for s in specs)


def decode(text: str) -> list[common_pb2.TensorSpec]:
    return [common_pb2.TensorSpec.FromString(bytes.fromhex(h)) for h in text.split(",")]


def main() -> int:
    verb, url, arg = sys.argv[1:4]
    store = open_store(url)
    try:
        if verb == "write":
            print(encode(store.put_sample("run", arg, 0, sample(arg))), flush=True)
            sys.stdin.read()
            return 0
        specs = decode(arg)
        name = specs[0].key.split("/")[2]
        try:
            got = store.get_sample(specs)
        except StoreError as exc:
            print(f"ERR {type(exc).__name__} {exc}", flush=True)
            return 0
        want = sample(name)
        same = all(torch.equal(got[k], want[k]) for k in want)
        print("ok" if same else "ERR mismatch", flush=True)
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
