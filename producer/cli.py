"""``draftflow producer``: run the target model over a run's prompts and feed the trainers."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading

from services.cliflags import add_service_flags, add_worker_flags, env

EPILOG = """\
What it does:
  registers with the coordinator (the run's fingerprint must match this node's tokenizer and
  capture layers), leases prompts, captures EAGLE3 features with the target model, writes them
  to the feature store and commits their refs. Once every prompt is captured it waits, since a
  trainer that rolls back or a lost tensor puts prompts back to capture, and it stops when the
  run ends (or at once with --exit-when-captured). SIGTERM / Ctrl-C / the Drain RPC stop it
  early: in-flight work is finished and committed, leases given back.

Examples:
  # a CPU node, tiny model, Mooncake master on the control host
  draftflow producer --coordinator ctl:50051 --run tiny \\
      --store 'mooncake://ctl:50061?local=10.0.0.7&segment_mb=1024'
  # a GPU node whose copy of the target lives elsewhere than the run config says
  draftflow producer --coordinator ctl:50051 --run r1 --model-path /models/llama-3.1-8b \\
      --device cuda --lease-batch 32 --token-budget 32768 --store "$STORE"
  # see how it is doing
  grpcurl -plaintext localhost:50052 draftflow.v1.ProducerService/GetStatus
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``producer`` subcommand."""
    p = sub.add_parser(
        "producer",
        help="capture target-model features for a run and commit them (the inference side)",
        description="Serve as a producer for one run: lease prompts from the coordinator, run "
        "the target model, write features to the feature store, commit refs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_flags(p)
    p.add_argument("--engine", default=env("DRAFTFLOW_ENGINE", "hf"),
                   help="capture engine: hf (transformers, CPU or GPU) or sglang (stock SGLang "
                   "with the draftflow plugin; see docs/sglang.md) [$DRAFTFLOW_ENGINE, default hf]")
    p.add_argument("--sglang-url", action="append", default=None,
                   help="sglang: a running SGLang server, http://HOST:PORT; repeat for several. "
                   "None: start SGLang in this process [$DRAFTFLOW_SGLANG_URLS, comma separated]")
    p.add_argument("--sglang-max-in-flight", type=int, default=16,
                   help="sglang over HTTP: most requests outstanding per server (default 16)")
    p.add_argument("--model-path", default=env("DRAFTFLOW_MODEL_PATH"),
                   help="target model directory on this node (default: the run's "
                   "target.model_path) [$DRAFTFLOW_MODEL_PATH]")
    p.add_argument("--device", default=env("DRAFTFLOW_DEVICE", "auto"),
                   help="auto (CUDA when available), cpu, cuda or cuda:N [$DRAFTFLOW_DEVICE]")
    p.add_argument("--dtype", default=env("DRAFTFLOW_DTYPE", "auto"),
                   choices=("auto", "bfloat16", "float16", "float32"),
                   help="model dtype; auto is bfloat16 on GPU, float32 on CPU [$DRAFTFLOW_DTYPE]")
    p.add_argument("--lease-batch", type=int, default=int(env("DRAFTFLOW_LEASE_BATCH", "8") or 8),
                   help="prompts leased and captured together (default 8)")
    p.add_argument("--token-budget", type=int,
                   default=int(env("DRAFTFLOW_TOKEN_BUDGET", "8192") or 8192),
                   help="most padded tokens in one forward pass (default 8192)")
    p.add_argument("--exit-when-captured", action="store_true",
                   default=env("DRAFTFLOW_EXIT_WHEN_CAPTURED", "") not in ("", "0", "false"),
                   help="stop once every prompt is captured instead of when the run ends; "
                   "then recaptures need a producer started again [$DRAFTFLOW_EXIT_WHEN_CAPTURED]")
    add_service_flags(p, role="producer", port=50052, metrics_port=9102)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import grpc

    from producer.engines import EngineError
    from producer.service import ProducerConfig, ProducerProcess
    from producer.worker import RegistrationRefused, WorkerConfig
    from services.rpc.server import ServerConfig

    identity = f"{socket.gethostname()}:{os.getpid()}"
    cfg = ProducerConfig(
        coordinator=args.coordinator, run_id=args.run, store_url=args.store, engine=args.engine,
        model_path=args.model_path, device=args.device, dtype=args.dtype,
        token_budget=args.token_budget,
        sglang_urls=tuple(args.sglang_url or filter(None, (env("DRAFTFLOW_SGLANG_URLS") or "")
                                                    .split(","))),
        sglang_max_in_flight=args.sglang_max_in_flight,
        worker=WorkerConfig(run_id=args.run, identity=identity, lease_batch=args.lease_batch,
                            revision=args.revision, exit_when_captured=args.exit_when_captured),
        coordinator_token=args.token, coordinator_ca=args.tls_ca,
        server=ServerConfig(listen=args.listen, auth_token=args.token, insecure=args.insecure),
        metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
    )
    try:
        proc = ProducerProcess(cfg)
    except RegistrationRefused as exc:
        raise SystemExit(f"draftflow producer: refused by the coordinator: {exc}") from None
    except (EngineError, ValueError) as exc:
        raise SystemExit(f"draftflow producer: {exc}") from None
    except grpc.RpcError as exc:
        raise SystemExit(f"draftflow producer: coordinator {args.coordinator}: "
                         f"{exc.code().name}: {exc.details()}") from None
    print(f"producer listening on port {proc.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    failed: BaseException | None = None
    try:
        # Until the run ends (or every prompt is captured), or SIGTERM/SIGINT asks for a drain.
        while not stop.is_set() and proc.wait(timeout=0.2) is None:
            pass
    except Exception as exc:
        failed = exc
    proc.stop()
    if failed is not None:
        raise SystemExit(f"draftflow producer: the work loop failed: {failed}")
    stats = proc.producer.stats
    print(f"producer done: {stats.samples_committed} samples committed, "
          f"{stats.prompts_failed} prompts failed", flush=True)
    return 0
