"""Capture throughput of one SGLang server through the draftflow plugin vs SGLang prefill alone.

Both runs use the same in-process SGLang engine (launched for capture) and the same prompts, in
the same process: the baseline asks for one greedy token per prompt and nothing else; the capture
run goes through ``SGLangEngine.capture_to_store`` (features written to Mooncake, refs verified).
Prints samples/s and tokens/s of each and their ratio (goal: capture/prefill >= 0.9).

    python bench/bench_sglang.py --model /path/to/model --prompts 512 --length 1024

Needs CUDA, SGLang >= 0.5.23 and draftflow installed in the same environment (pip install -e .);
elsewhere it prints why it cannot run and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def missing() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if importlib.util.find_spec("sglang") is None:
        return "needs SGLang (pip install 'draftflow[sglang]')"
    if not any(
        ep.value == "producer.sglang_plugin:register"
        for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")
    ):
        return "needs draftflow installed (pip install -e .) so SGLang loads the plugin"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target model directory (default: a tiny local one)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--mem-fraction", type=float, default=0.6)
    parser.add_argument(
        "--segment-mb",
        type=int,
        default=8192,
        help="Mooncake segment lent by this process; fits one run's features",
    )
    args = parser.parse_args()
    reason = missing()
    if reason:
        print(f"bench_sglang skipped: {reason}")
        return 0

    from producer.engines.base import EngineConfig
    from producer.engines.hf import plan_batches
    from producer.engines.sglang import CapturedRef, CaptureItem, SGLangEngine, SGLangOptions
    from services.store import open_store
    from services.store.mooncake_proc import start_master

    work = Path(tempfile.mkdtemp(prefix="bench-sglang-"))
    model = args.model
    if model is None:
        from services.tiny_model import build_tiny_target

        model = str(
            build_tiny_target(work / "target", num_layers=8, hidden_size=1024, vocab_size=4096)
        )
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(8, 4000, (args.length,), generator=gen).tolist() for _ in range(args.prompts)
    ]
    tokens = sum(len(p) for p in prompts)

    master = start_master()
    try:
        # Each run's keys are removed afterwards: the segment holds one run's features.
        url = master.url("bench", segment_mb=args.segment_mb, buffer_mb=512)
        store = open_store(url)
        engine = SGLangEngine(
            EngineConfig(model_path=model, token_budget=args.token_budget, dtype="bfloat16"),
            SGLangOptions(
                store=store,
                store_url=url,
                engine_kwargs={"mem_fraction_static": args.mem_fraction, "log_level": "warning"},
            ),
        )
        sglang_engine = engine._servers[0]._engine

        def prefill_only() -> float:
            start = time.perf_counter()
            for group in plan_batches([len(p) for p in prompts], args.token_budget):
                sglang_engine.generate(
                    input_ids=[prompts[i] for i in group],
                    sampling_params={"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True},
                )
            return time.perf_counter() - start

        def capture(tag: str) -> float:
            items = [CaptureItem("bench", f"{tag}{i}", 0, tuple(p)) for i, p in enumerate(prompts)]
            start = time.perf_counter()
            outcomes = engine.capture_to_store(items)
            elapsed = time.perf_counter() - start
            refs = [o for o in outcomes if isinstance(o, CapturedRef)]
            if len(refs) != len(items):
                raise SystemExit(f"capture failed: {[o for o in outcomes if o not in refs][:3]}")
            store.remove([s.key for r in refs for s in r.tensors])
            return elapsed

        prefill_only()
        capture("warm")
        base = prefill_only()
        captured = capture("run")
        engine.close()
        store.close()
    finally:
        master.stop()

    print(f"device: {torch.cuda.get_device_name()}  model: {model}")
    print(f"prompts: {args.prompts} x {args.length} tokens")
    for name, seconds in (("prefill only", base), ("capture via plugin", captured)):
        print(
            f"{name:>20}: {args.prompts / seconds:9.1f} samples/s  "
            f"{tokens / seconds:11.0f} tokens/s"
        )
    print(f"capture / prefill throughput ratio: {base / captured:.3f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
