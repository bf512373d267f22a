"""DFlash/Domino loss and metrics against naive per-slot references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.dflash.tiny import MASK_ID, build, sample, target_head
from trainer.strategies.base import StepContext
from trainer.strategies.dflash import linear_lambda_base
from trainer.strategies.dflash.objective import accept_lengths

BS = 4


def _batch(spec, samples, seeds):
    return spec.prepare(spec.collate(samples), torch.tensor(seeds))


def _samples():
    return [sample(14, 1, supervised_from=3), sample(9, 2, supervised_from=1)]


def naive_slots(model, head, batch, shift: bool, gamma: float, prefix: str = ""):
    """(label, weight, final logits, base logits) of every supervised block slot, by loops."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    anchors, keep = batch[f"{prefix}anchors"], batch[f"{prefix}keep"]
    b, n = anchors.shape
    seq = ids.shape[1]
    noise = torch.full((b, n, BS), MASK_ID)
    for r in range(b):
        for j in range(n):
            if keep[r, j]:
                noise[r, j, 0] = ids[r, anchors[r, j]]
    with torch.no_grad():
        hidden = model.backbone(F.embedding(noise, head.embed), batch["hidden_states"],
                                anchors, keep)
    cfg = model.config
    out = []
    for r in range(b):
        for j in range(n):
            a = int(anchors[r, j])
            for k in range(BS):
                at = a + k + int(shift)
                if not keep[r, j] or at >= seq or mask[r, at] == 0 or (k == 0 and not shift):
                    continue
                d = 1.0 if gamma == 0 else math.exp(-(k if shift else max(k - 1, 0)) / gamma)
                h = hidden[r, j, k]
                base = h @ head.lm_head.T
                final = base
                if cfg.is_domino and k >= cfg.suffix_start:
                    last = k if shift else k - 1
                    toks = [int(ids[r, p]) if p < seq else 0 for p in range(a, a + last + 1)]
                    with torch.no_grad():
                        states, _ = model.prefix_gru(head.embed[toks].unsqueeze(0))
                        final = base + model.embed_proj(torch.cat([h, states[0, -1]]))
                out.append((int(ids[r, at]), d, final, base))
    return out


def naive_mean(slots, which: int = 2) -> float:
    num = sum(s[1] * F.cross_entropy(s[which], torch.tensor(s[0])).item() for s in slots)
    return num / sum(s[1] for s in slots)


@pytest.mark.parametrize("gamma", [0.0, 7.0])
def test_dflash_loss_is_the_naive_weighted_mean(gamma: float) -> None:
    head = target_head()
    spec, model = build("dflash", head, loss_decay_gamma=gamma, objective_chunk_blocks=2)
    batch = _batch(spec, _samples(), [11, 12])
    with torch.no_grad():
        out = spec.loss(model, head, batch, spec.normaliser(batch), StepContext())
    slots = naive_slots(model, head, batch, shift=False, gamma=gamma)
    assert out.loss.item() == pytest.approx(naive_mean(slots), rel=1e-6)
    metrics = spec.summarise(out.sums)
    assert metrics["loss"] == pytest.approx(naive_mean(slots), rel=1e-6)
    assert metrics["counted"] == len(slots)
    hits = [int(f.argmax()) == lab for lab, _, f, _ in slots]
    assert metrics["accuracy"] == pytest.approx(sum(hits) / len(slots))
    counts = torch.bincount(torch.tensor([s[0] for s in slots]), minlength=head.vocab_size)
    assert torch.equal(out.sums["label_counts"], counts.double())
    assert {f"acc_{k}" for k in range(1, BS)} <= set(metrics) and "acc_0" not in metrics


def test_the_step_loss_is_the_mean_over_all_micro_batches() -> None:
    head = target_head()
    spec, model = build("dflash", head, loss_decay_gamma=7.0)
    parts = [_batch(spec, [s], [i]) for i, s in enumerate([*_samples(), sample(20, 3)])]
    norm = sum(spec.normaliser(p) for p in parts)
    with torch.no_grad():
        total = sum(spec.loss(model, head, p, norm, StepContext()).loss for p in parts)
    slots = [s for p in parts for s in naive_slots(model, head, p, False, 7.0)]
    assert total.item() == pytest.approx(naive_mean(slots), rel=1e-6)


@pytest.mark.parametrize("shift", [False, True])
def test_domino_loss_mixes_final_and_base_with_the_step_lambda(shift: bool) -> None:
    head = target_head()
    spec, model = build("domino", head, shift_label=shift, loss_decay_gamma=5.0,
                        lambda_base_start=0.8, lambda_base_decay_ratio=0.5)
    batch = _batch(spec, _samples(), [3, 4])
    ctx = StepContext(completed_steps=2, total_steps=10)
    lam = 0.8 * (1 - 2 / 5)
    with torch.no_grad():
        out = spec.loss(model, head, batch, spec.normaliser(batch), ctx)
    slots = naive_slots(model, head, batch, shift=shift, gamma=5.0)
    final, base = naive_mean(slots, 2), naive_mean(slots, 3)
    assert out.loss.item() == pytest.approx((1 - lam) * final + lam * base, rel=1e-6)
    m = spec.summarise(out.sums)
    assert m["lambda_base"] == pytest.approx(lam)
    assert m["final_loss"] == pytest.approx(final, rel=1e-6)
    assert m["base_loss"] == pytest.approx(base, rel=1e-6)
    first = 0 if shift else 1
    assert {f"acc_{k}" for k in range(first, BS)} <= set(m)
    for key in ("accuracy", "acceptance_length", "counted", "base_accuracy", "accept_len",
                "base_accept_len"):
        assert key in m
    assert m["accept_len"] == m["acceptance_length"]


def test_acceptance_length_follows_the_leading_hits() -> None:
    t, f = True, False
    hit = torch.tensor([[t, t, f, t], [f, f, f, f], [f, t, t, t], [t, t, t, t]])
    sup = torch.tensor([[f, t, t, t], [f, f, f, f], [t, f, t, t], [f, t, f, t]])
    total, blocks = accept_lengths(hit & sup, sup)
    # Row 0: slot 0 unsupervised (transparent), slot 1 hit, slot 2 miss -> 2. Row 1 has no
    # supervision and is not counted. Row 2 misses at once -> 1. Row 3: 1 + 2 hits -> 3.
    assert (total.item(), blocks.item()) == (6, 3)


def test_acceptance_length_uses_every_deterministic_anchor() -> None:
    head = target_head()
    spec, model = build("dflash", head, num_anchors=50)
    batch = _batch(spec, _samples(), [1, 2])
    with torch.no_grad():
        out = spec.loss(model, head, batch, spec.normaliser(batch), StepContext())
    assert int(batch["eval_keep"].sum()) == (14 - 3 - 1) + (9 - 1 - 1)
    # Recount by loops over the deterministic blocks (slots come in block order).
    ids, mask = batch["input_ids"], batch["loss_mask"]
    hidden_slots = iter(naive_slots(model, head, batch, False, 0.0, prefix="eval_"))
    total = blocks = 0
    anchors, keep = batch["eval_anchors"], batch["eval_keep"]
    for r in range(anchors.shape[0]):
        for j in range(anchors.shape[1]):
            if not keep[r, j]:
                continue
            a, run, alive, scored = int(anchors[r, j]), 0, True, False
            for k in range(1, BS):
                at = a + k
                if at >= ids.shape[1] or mask[r, at] == 0:
                    continue
                lab, _, final, _ = next(hidden_slots)
                scored = True
                alive = alive and int(final.argmax()) == lab
                run += int(alive)
            if scored:
                total, blocks = total + 1 + run, blocks + 1
    m = spec.summarise(out.sums)
    assert m["acceptance_length"] == pytest.approx(total / blocks)


def test_lambda_schedule() -> None:
    assert linear_lambda_base(0, 10, 1.0, 0.5) == 1.0
    assert linear_lambda_base(5, 10, 1.0, 0.5) == 0.0
    assert linear_lambda_base(10, 10, 1.0, 0.5) == 0.0
    assert linear_lambda_base(5, 10, 1.0, 1.0) == 0.5
    assert linear_lambda_base(3, 10, 0.6, 1.0) == pytest.approx(0.42)
    assert linear_lambda_base(20, 10, 1.0, 1.0) == 0.0
    assert linear_lambda_base(0, 1, 1.0, 0.5) == 1.0  # the span is at least one step


@pytest.mark.parametrize("ctx", [None, StepContext(3, None), StepContext(3, 0)])
def test_domino_without_a_horizon_is_refused(ctx) -> None:
    head = target_head()
    spec, model = build("domino", head)
    batch = _batch(spec, _samples(), [1, 2])
    with pytest.raises(ValueError, match="optimizer-step horizon"):
        spec.loss(model, head, batch, spec.normaliser(batch), ctx)


def test_domino_gradients_reach_the_head_and_the_backbone() -> None:
    head = target_head()
    spec, model = build("domino", head)
    batch = _batch(spec, _samples(), [1, 2])
    out = spec.loss(model, head, batch, spec.normaliser(batch), StepContext(5, 10))
    out.loss.backward()
    for name in ("prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight",
                 "embed_proj.2.weight", "fc.weight", "layers.0.self_attn.q_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def _run(algorithm: str, chunk: int, **options):
    head = target_head()
    spec, model = build(algorithm, head, objective_chunk_blocks=chunk, num_anchors=7,
                        **options)
    batch = _batch(spec, _samples(), [5, 6])
    out = spec.loss(model, head, batch, spec.normaliser(batch), StepContext(2, 10))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize(("algorithm", "options"), [
    ("dflash", {}), ("domino", {"shift_label": False}), ("domino", {"shift_label": True}),
])
def test_chunked_objective_equals_the_unchunked_one(algorithm: str, options: dict) -> None:
    whole, whole_grads = _run(algorithm, 0, **options)
    for chunk in (1, 3):
        part, part_grads = _run(algorithm, chunk, **options)
        torch.testing.assert_close(part.loss, whole.loss, rtol=1e-12, atol=1e-12)
        assert part.sums.keys() == whole.sums.keys()
        for key in whole.sums:
            torch.testing.assert_close(part.sums[key], whole.sums[key], rtol=1e-12, atol=1e-12)
        for name, grad in whole_grads.items():
            torch.testing.assert_close(part_grads[name], grad, rtol=1e-10, atol=1e-12)
