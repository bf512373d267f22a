"""A tiny target model and EAGLE3 features computed in process with plain transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.tiny_model import build_tiny_target
from trainer.vocab import most_frequent

NUM_LAYERS = 8
AUX_LAYER_IDS = [1, NUM_LAYERS // 2 - 1, NUM_LAYERS - 4]
DRAFT_VOCAB = 128


@dataclass(frozen=True)
class TinySetup:
    target_dir: Path
    train: list[dict[str, torch.Tensor]]
    held_out: list[dict[str, torch.Tensor]]
    draft_token_ids: list[int]
    aux_layer_ids: list[int]


def capture(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int) -> dict[str, torch.Tensor]:
    """EAGLE3 features of one sequence: hidden_states[i+1] is layer i's output, [-1] post-norm."""
    with torch.no_grad():
        out = model(ids.unsqueeze(0), output_hidden_states=True)
    hs = out.hidden_states
    aux = torch.cat([hs[i + 1][0] for i in AUX_LAYER_IDS], dim=-1)
    mask = torch.zeros(ids.numel(), dtype=torch.uint8)
    mask[prompt_len:] = 1
    return {"input_ids": ids.clone(), "loss_mask": mask, "aux_hidden_state": aux.contiguous(),
            "hidden_state": hs[-1][0].contiguous()}


def _samples(model: torch.nn.Module, n: int, gen: torch.Generator, vocab: int) -> list[dict]:
    """Prompts of random tokens, continued greedily by the target (the trained span)."""
    out = []
    for i in range(n):
        prompt_len = 4 + i % 5
        prompt = torch.randint(8, vocab, (prompt_len,), generator=gen)
        new = 12 + (i * 7) % 13
        with torch.no_grad():
            seq = model.generate(prompt.unsqueeze(0), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, attention_mask=torch.ones(1, prompt_len,
                                 dtype=torch.long))[0]
        out.append(capture(model, seq, prompt_len))
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    target_dir = build_tiny_target(root / "target", num_layers=NUM_LAYERS, hidden_size=64,
                                   vocab_size=512, seed=0)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared box
    train = _samples(model, 96, gen, vocab)
    held_out = _samples(model, 16, gen, vocab)
    ids = most_frequent([s["input_ids"] for s in train], [s["loss_mask"] for s in train],
                        DRAFT_VOCAB, vocab)
    return TinySetup(target_dir, train, held_out, ids, AUX_LAYER_IDS)


# --- a real coordinator and Mooncake master for coordinator-driven trainer tests ------------


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory):  # -> Iterator[MasterHandle]
    """A real mooncake_master on free loopback ports, shared by a module's tests."""
    from services.store.mooncake_proc import start_master

    handle = start_master(log_path=tmp_path_factory.mktemp("mooncake") / "master.log")
    yield handle
    handle.stop()
