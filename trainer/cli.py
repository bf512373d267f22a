"""``draftflow trainer``: train a run's draft model from the coordinator's step stream."""

from __future__ import annotations

import argparse

from services.cliflags import add_service_flags, add_worker_flags, env

EPILOG = """\
What it does:
  registers each rank with the coordinator (the run's fingerprint must match this node's
  tokenizer), resumes from the coordinator's last committed checkpoint, streams this rank's
  slice of every step, reads the tensors from the feature store, trains the draft, commits each
  step, checkpoints every training.checkpoint_every steps to OUT/checkpoints, and at the end of
  the data writes a final checkpoint and exports the draft to OUT/final (loadable by SGLang with
  --speculative-algorithm EAGLE3 --speculative-draft-model-path OUT/final).
  Restarting the same command after a crash resumes; the coordinator re-delivers the same steps.
  SIGTERM / Ctrl-C: finish the current step, checkpoint, stop (a second signal kills).

Ranks:
  run under torchrun (there, write --run-id, not --run); the number of ranks must equal the
  run's step.world_size. Each rank streams its own slice. Rank 0 serves TrainerService and
  /metrics and commits.

Examples:
  # one CPU process, tiny run
  draftflow trainer --coordinator 127.0.0.1:50051 --run tiny --out ./out/tiny \\
      --store 'mooncake://127.0.0.1:50061' --device cpu
  # 8 GPUs on one node
  torchrun --nproc-per-node 8 -m draftflow trainer --coordinator ctl:50051 --run-id r1 \\
      --store "mooncake://ctl:50061?local=$NODE_IP" --out /checkpoints/r1
  # see how it is doing, or ask for a checkpoint now
  grpcurl -plaintext localhost:50053 draftflow.v1.TrainerService/GetStatus
  grpcurl -plaintext localhost:50053 draftflow.v1.TrainerService/SaveCheckpoint
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``trainer`` subcommand."""
    p = sub.add_parser(
        "trainer",
        help="train the draft model from a run's step stream (the training side)",
        description="Serve as the trainer group of one run: stream step bundles from the "
        "coordinator, read features from the feature store, train, checkpoint, export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_flags(p, run_aliases=("--run-id",),
                     run_help="; under torchrun spell it --run-id (torchrun takes --run for its "
                     "own --run-path)")
    p.add_argument("--out", required=env("DRAFTFLOW_OUT") is None, default=env("DRAFTFLOW_OUT"),
                   help="output directory: OUT/checkpoints, OUT/final (the exported draft) and "
                   "OUT/trainer-status.json (the last step's status); shared by all ranks and "
                   "kept across restarts [$DRAFTFLOW_OUT]")
    p.add_argument("--model-path", default=env("DRAFTFLOW_MODEL_PATH"),
                   help="target model directory on this node; only its embedding, lm_head and "
                   "tokenizer are read (default: the run's target.model_path) "
                   "[$DRAFTFLOW_MODEL_PATH]")
    p.add_argument("--device", default=env("DRAFTFLOW_DEVICE"),
                   help="cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu) "
                   "[$DRAFTFLOW_DEVICE]")
    p.add_argument("--parallel", default=env("DRAFTFLOW_PARALLEL", "ddp"),
                   choices=("ddp", "fsdp", "none"),
                   help="data parallelism over ranks (default ddp) [$DRAFTFLOW_PARALLEL]")
    p.add_argument("--prefetch", type=int, default=int(env("DRAFTFLOW_PREFETCH", "2") or 2),
                   help="steps read ahead of the one being trained (default 2) "
                   "[$DRAFTFLOW_PREFETCH]")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (checkpoint and export) even if data remains")
    add_service_flags(p, role="trainer", port=50053, metrics_port=9103)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    import grpc
    import torch.distributed as dist

    from services.rpc.server import ServerConfig
    from trainer.runner import CoordinatorRunner, RunnerConfig
    from trainer.service import TrainerServer
    from trainer.session import RegistrationRefused

    cfg = RunnerConfig(
        coordinator=args.coordinator, run_id=args.run, store_url=args.store,
        out_dir=Path(args.out), model_path=args.model_path, device=args.device,
        parallel=args.parallel, prefetch=args.prefetch, max_steps=args.max_steps,
        token=args.token, tls_ca=args.tls_ca, revision=args.revision,
    )
    try:
        runner = CoordinatorRunner(cfg)
    except RegistrationRefused as exc:
        raise SystemExit(f"draftflow trainer: refused by the coordinator: {exc}") from None
    except grpc.RpcError as exc:
        raise SystemExit(f"draftflow trainer: coordinator {args.coordinator}: "
                         f"{exc.code().name}: {exc.details()}") from None
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"draftflow trainer: {exc}") from None
    server = None
    if runner.dist.rank == 0:
        server = TrainerServer(runner, ServerConfig(listen=args.listen, auth_token=args.token,
                                                    insecure=args.insecure),
                               args.metrics_port, args.metrics_addr)
        print(f"trainer listening on port {server.port}", flush=True)

    def on_signal(signum: int, _frame: object) -> None:
        runner.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal ends the process
            signal.signal(sig, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        step = runner.run()
    except RegistrationRefused as exc:
        # Registering again after the session expired: a newer group took over, or the run
        # was cancelled meanwhile.
        raise SystemExit(f"draftflow trainer: rank {runner.dist.rank}: the coordinator "
                         f"refused: {exc}") from None
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        # The coordinator refuses this group (superseded, expired, cancelled): say why, briefly.
        raise SystemExit(f"draftflow trainer: rank {runner.dist.rank}: the coordinator "
                         f"refused: {exc.details()}") from None
    finally:
        if server is not None:
            server.stop()
        runner.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    s = runner.status
    if runner.dist.rank == 0:
        how = "stopped" if runner.stopped else "done"
        print(f"trainer {how}: step {step}, loss {s.loss:.4f}, "
              f"{s.steps_trained} steps trained here, {s.samples_lost} samples lost and "
              f"recaptured, data wait {100 * s.data_wait_fraction:.1f}%", flush=True)
    return 0
