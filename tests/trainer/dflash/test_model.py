"""The draft backbone: attention backends, dropped blocks, module tree, seeding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.dflash.tiny import LAYER_IDS, build, settings, target_head
from trainer.strategies import get_strategy
from trainer.strategies.dflash import DFlashConfig, DFlashDraft
from trainer.strategies.dflash.model import attend

LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]


def _inputs(b: int = 2, n: int = 3, bs: int = 4, seq: int = 12, width: int = 64):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(b, n, bs, 32, generator=gen, dtype=torch.float64)
    hidden = torch.randn(b, seq, width, generator=gen, dtype=torch.float64)
    anchors = torch.tensor([[0, 4, 5], [2, 9, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    return noise, hidden, anchors, keep


def _draft(backend: str) -> DFlashDraft:
    head = target_head()
    _, model = build("dflash", head, num_hidden_layers=3, layer_types=LAYERS, sliding_window=3)
    model.config = dataclasses.replace(model.config, attention_backend=backend)
    return model


def test_eager_equals_sdpa_on_full_and_sliding_layers() -> None:
    eager, sdpa = _draft("eager"), _draft("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    args = _inputs()
    torch.testing.assert_close(eager.backbone(*args), sdpa.backbone(*args),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dropped_blocks_give_zero_attention_and_finite_gradients(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    allowed = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    allowed[..., 2:4, :] = False
    out = attend(q, k, v, allowed, backend)
    assert torch.equal(out[:, :, 2:4], torch.zeros_like(out[:, :, 2:4]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

    model = _draft(backend)
    noise, hidden, anchors, keep = _inputs()
    noise.requires_grad_(True)
    out = model.backbone(noise, hidden, anchors, keep)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(noise.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_block_depends_only_on_context_before_its_anchor() -> None:
    model = _draft("sdpa")
    noise, hidden, anchors, keep = _inputs()
    before = model.backbone(noise, hidden, anchors, keep)
    changed = hidden.clone()
    changed[0, 4:] += 1.0  # from anchor 4 on: block 0 (anchor 0) and block 1 (4) blind to it
    after = model.backbone(noise, changed, anchors, keep)
    torch.testing.assert_close(after[0, :2], before[0, :2], rtol=0, atol=0)
    assert not torch.allclose(after[0, 2], before[0, 2])  # anchor 5 sees position 4
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)


def test_module_tree_is_the_export_names_and_the_seed_fixes_the_weights() -> None:
    head = target_head()
    spec = get_strategy("dflash", mask_token_id=5, num_hidden_layers=2, block_size=4)
    a, b = spec.build_model(settings(head, seed=9)), spec.build_model(settings(head, seed=9))
    c = spec.build_model(settings(head, seed=10))
    state = a.state_dict()
    assert not any("rotary" in k or "embed" in k or "lm_head" in k for k in state)
    assert state["fc.weight"].shape == (32, len(LAYER_IDS) * 32)
    assert state["layers.1.self_attn.q_proj.weight"].shape == (4 * 8, 32)  # head_dim = H/heads
    assert state["layers.1.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    assert not torch.equal(state["fc.weight"], c.state_dict()["fc.weight"])


def test_draft_config_mirrors_the_target() -> None:
    head = target_head()
    _, model = build("dflash", head)
    cfg: DFlashConfig = model.config
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size) == (
        32, 8, 2, 96)
    assert cfg.target_layer_ids == tuple(LAYER_IDS) and cfg.num_target_layers == 4


def test_noise_blocks_are_the_anchor_token_then_mask() -> None:
    head = target_head()
    _, model = build("dflash", head)
    ids = torch.tensor([[[7, 8, 9, 10], [3, 4, 5, 6]]])
    keep = torch.tensor([[True, False]])
    got = model.noise_embeddings(ids, keep, head.embed)
    mask = model.config.mask_token_id
    want = F.embedding(torch.tensor([[[7, mask, mask, mask], [mask] * 4]]), head.embed)
    assert torch.equal(got, want)
