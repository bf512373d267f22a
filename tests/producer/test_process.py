"""`draftflow producer` processes against a real coordinator and a real Mooncake master."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from producer.dataprep import messages_from_conversation, prepare_prompt
from services.dataset import parse_line, prompt_id
from services.store import open_store
from services.store.mooncake_proc import start_holder, start_master
from tests.producer.helpers import create_run, lines, read_all_steps, status

REPO = Path(__file__).resolve().parents[2]


def _producer_argv(coordinator_port: int, store_url: str) -> list[str]:
    return [sys.executable, "-m", "draftflow", "producer",
            "--coordinator", f"127.0.0.1:{coordinator_port}", "--run", "r1",
            "--store", store_url, "--device", "cpu", "--lease-batch", "2",
            "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--exit-when-captured"]


@pytest.mark.slow
def test_killed_producer_is_replaced_and_features_read_elsewhere(
        coordinator, stub, llama_dir: Path, llama_tokenizer, engine, tmp_path: Path) -> None:
    master = start_master(client_ttl_s=2, log_path=tmp_path / "master.log")
    # The holder lends the pool its memory, so samples outlive the producers that wrote them.
    holder = start_holder(master.address, segment_mb=64, metadata=master.metadata)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first: subprocess.Popen[str] | None = None
    try:
        rows = lines(10)
        run = create_run(stub, llama_dir, rows, lease_seconds=3, heartbeat_seconds=0.5)
        store_id = f"p{uuid.uuid4().hex[:8]}"
        argv = _producer_argv(coordinator.port, master.url(store_id, buffer_mb=32))
        first = subprocess.Popen(argv, env=env, cwd=REPO, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:  # kill it while it holds a lease, after it has committed something
            st = status(stub)
            if st.prompts.get("CAPTURED", 0) >= 2 and st.prompts.get("LEASED", 0) >= 1:
                break
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first producer never got going"
            time.sleep(0.02)
        first.kill()
        first.wait()
        captured_before = status(stub).prompts["CAPTURED"]
        assert captured_before < len(rows)

        second = subprocess.run(argv, env=env, cwd=REPO, text=True, capture_output=True,
                                timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        assert (f"producer done: {len(rows) - captured_before} samples committed, "
                "0 prompts failed") in second.stdout
        st = status(stub)
        assert st.prompts["CAPTURED"] == len(rows)
        assert st.prompts.get("LEASED", 0) == st.prompts.get("DEAD", 0) == 0

        # This test process is neither producer: it reads every sample through its own client.
        reader = open_store(master.url(store_id, buffer_mb=32))
        try:
            samples = read_all_steps(stub, run, reader)
        finally:
            reader.close()
        convs = {prompt_id(parse_line(r)): parse_line(r) for r in rows}
        assert sorted(ref.prompt_id for ref, _ in samples) == sorted(convs)
        for ref, tensors in samples:
            prompt = prepare_prompt(llama_tokenizer,
                                    messages_from_conversation(convs[ref.prompt_id]), 96)
            assert torch.equal(tensors["input_ids"], prompt.input_ids)
            assert torch.equal(tensors["loss_mask"], prompt.loss_mask)
            alone = engine.capture([prompt.input_ids.tolist()])[0]
            torch.testing.assert_close(tensors["hidden_state"], alone.hidden_state,
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tensors["aux_hidden_state"], alone.aux_hidden_state,
                                       atol=1e-5, rtol=1e-5)
    finally:
        if first is not None and first.poll() is None:
            first.kill()
            first.wait()
        holder.stop()
        master.stop()
