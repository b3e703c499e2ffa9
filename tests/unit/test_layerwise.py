"""LAMB and LARS against their papers' updates, written out here per layer in float64, against timm's
implementations (the maintained peer), and cut into fragments as DeepSpeed hands them over."""

from __future__ import annotations

import copy

import pytest
import torch

from distdl.optim.layerwise import FragmentLayout, Lamb, Lars

LR, WEIGHT_DECAY = 0.01, 0.1


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3)).double()


def groups(model: torch.nn.Module) -> list[dict]:
    """Matrices decayed and adapted; biases and norm weights neither (as distdl's param_groups)."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def set_gradients(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    model.zero_grad()
    x = torch.randn(16, 5, dtype=torch.float64)
    (model(x) ** 2).mean().backward()


def lamb_by_hand(model: torch.nn.Module, steps: int, betas=(0.9, 0.999), eps=1e-6) -> list[torch.Tensor]:
    """You et al. 2019, Algorithm 2 with bias correction, one layer at a time."""
    weights = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for t in range(1, steps + 1):
        set_gradients(model, seed=t)
        for i, (w, p) in enumerate(zip(weights, model.parameters())):
            g = p.grad
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            decayed = p.ndim >= 2
            r = m_hat / (v_hat.sqrt() + eps) + (WEIGHT_DECAY * w if decayed else 0)
            ratio = (w.norm() / r.norm()).item() if decayed else 1.0
            w -= LR * ratio * r
        with torch.no_grad():  # the model carries the weights the next gradients are taken at
            for w, p in zip(weights, model.parameters()):
                p.copy_(w)
    return weights


def lars_by_hand(model: torch.nn.Module, steps: int, lrs: list[float], momentum=0.9, eta=0.001) -> list[torch.Tensor]:
    """You et al. 2017, Algorithm 1 (MLPerf's form: lr inside the momentum), one layer at a time."""
    weights = [p.detach().clone() for p in model.parameters()]
    velocity = [torch.zeros_like(w) for w in weights]
    for t in range(steps):
        set_gradients(model, seed=t + 1)
        for i, (w, p) in enumerate(zip(weights, model.parameters())):
            g = p.grad
            if p.ndim >= 2:
                local_lr = eta * w.norm() / (g.norm() + WEIGHT_DECAY * w.norm())
                velocity[i] = momentum * velocity[i] + lrs[t] * local_lr * (g + WEIGHT_DECAY * w)
            else:
                velocity[i] = momentum * velocity[i] + lrs[t] * g
            w -= velocity[i]
        with torch.no_grad():
            for w, p in zip(weights, model.parameters()):
                p.copy_(w)
    return weights


def run(optimizer_cls, model: torch.nn.Module, steps: int, lrs: list[float] | None = None, **options):
    optimizer = optimizer_cls(groups(model), lr=LR, **options)
    for t in range(steps):
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[t]
        set_gradients(model, seed=t + 1)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_lamb_is_the_papers_update():
    expected = lamb_by_hand(small_model(), steps=3)
    ours = run(Lamb, small_model(), steps=3, weight_decay=WEIGHT_DECAY, eps=1e-6)
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    # The trust ratio changed the step: plain Adam with decoupled decay lands elsewhere.
    adam = run(torch.optim.AdamW, small_model(), steps=3, weight_decay=WEIGHT_DECAY, eps=1e-6)
    assert not torch.allclose(adam[0], ours[0], rtol=1e-3)


def test_lars_is_the_papers_update_with_the_lr_inside_the_momentum():
    lrs = [0.5, 1.0, 2.0]  # a schedule, where the lr's place (inside or outside the momentum) matters
    expected = lars_by_hand(small_model(), steps=3, lrs=lrs)
    ours = run(Lars, small_model(), steps=3, lrs=lrs, weight_decay=WEIGHT_DECAY, trust_coefficient=0.001)
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)


def test_lamb_and_lars_agree_with_timm():
    import timm.optim as timm_optim  # the test extra installs it

    # timm's Lamb: its own gradient clipping off (DeepSpeed clips), biases and norms not adapted.
    theirs = run(timm_optim.Lamb, small_model(), steps=3, weight_decay=WEIGHT_DECAY, eps=1e-6, max_grad_norm=None)
    ours = run(Lamb, small_model(), steps=3, weight_decay=WEIGHT_DECAY, eps=1e-6)
    for mine, peer in zip(ours, theirs):
        torch.testing.assert_close(mine, peer, rtol=1e-12, atol=1e-14)
    # timm's Lars keeps the lr outside the momentum; at a constant lr the two forms are the same
    # algebraically, and differ in float64 rounding (the lr multiplies at another place).
    theirs = run(timm_optim.Lars, small_model(), steps=3, weight_decay=WEIGHT_DECAY, momentum=0.9, trust_coeff=0.001)
    ours = run(Lars, small_model(), steps=3, weight_decay=WEIGHT_DECAY, momentum=0.9, trust_coefficient=0.001)
    for mine, peer in zip(ours, theirs):
        torch.testing.assert_close(mine, peer, rtol=1e-10, atol=1e-12)


class FlatGroups:
    """A model's two groups as DeepSpeed's fp16 optimizer hands them over: one flat float64 tensor per
    group (plus padding), its layers cut into arbitrary segments, a layer straddling cuts."""

    def __init__(self, model: torch.nn.Module, padding: int = 3) -> None:
        self.model = model
        self.parts = [[p for p in g["params"]] for g in groups(model)]
        self.flat = [torch.cat([p.detach().reshape(-1) for p in ps] + [torch.zeros(padding, dtype=torch.float64)])
                     for ps in self.parts]
        self.layouts = {}
        for flat, ps in zip(self.flat, self.parts):
            lengths, layers = [], []
            for layer, p in enumerate(ps):
                half = p.numel() // 2  # two segments per layer, as if a partition boundary fell inside it
                lengths += [half, p.numel() - half]
                layers += [layer, layer]
            self.layouts[flat] = FragmentLayout(tuple(lengths + [padding]), tuple(layers + [-1]), len(ps))

    def load_gradients(self) -> None:
        for flat, ps in zip(self.flat, self.parts):
            flat.grad = torch.cat([p.grad.reshape(-1) for p in ps] + [torch.zeros(flat.numel() - sum(p.numel() for p in ps),
                                                                                 dtype=torch.float64)])

    def weights(self) -> list[torch.Tensor]:
        out = []
        for flat, ps in zip(self.flat, self.parts):
            sizes = [p.numel() for p in ps]
            out += [w.view_as(p) for w, p in zip(torch.split(flat[:sum(sizes)], sizes), ps)]
        order = {id(p): i for i, p in enumerate(self.model.parameters())}
        flat_order = [id(p) for ps in self.parts for p in ps]
        return [out[flat_order.index(pid)] for pid in sorted(order, key=order.get)]

    def write_back(self) -> None:
        with torch.no_grad():
            for w, p in zip(self.weights(), self.model.parameters()):
                p.copy_(w)


@pytest.mark.parametrize("optimizer_cls, options", [(Lamb, {"eps": 1e-6}), (Lars, {"momentum": 0.9})])
def test_fragments_of_flat_tensors_give_the_per_layer_update(optimizer_cls, options):
    expected = run(optimizer_cls, small_model(), steps=3, weight_decay=WEIGHT_DECAY, **options)
    flat = FlatGroups(small_model())
    optimizer = optimizer_cls([{"params": [flat.flat[0]], "weight_decay": WEIGHT_DECAY},
                               {"params": [flat.flat[1]], "weight_decay": 0.0}], lr=LR, **options)
    optimizer.set_layouts(flat.layouts)
    for t in range(3):
        set_gradients(flat.model, seed=t + 1)
        flat.load_gradients()
        optimizer.step()
        flat.write_back()
    for mine, theirs in zip(flat.weights(), expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    # Without the layout, one norm over the whole flat tensor: not the paper's update.
    unlaid = FlatGroups(small_model())
    optimizer = optimizer_cls([{"params": [unlaid.flat[0]], "weight_decay": WEIGHT_DECAY}], lr=LR, **options)
    set_gradients(unlaid.model, seed=1)
    unlaid.load_gradients()
    optimizer.step()
    first_step = run(optimizer_cls, small_model(), steps=1, weight_decay=WEIGHT_DECAY, **options)
    assert not torch.allclose(unlaid.weights()[0], first_step[0], rtol=1e-6)


def test_a_layer_whose_norms_are_zero_takes_a_ratio_of_one():
    model = copy.deepcopy(small_model())
    with torch.no_grad():
        model[0].weight.zero_()
    before = model[0].weight.detach().clone()
    optimizer = Lamb(groups(model), lr=LR, weight_decay=WEIGHT_DECAY)
    set_gradients(model, seed=1)
    optimizer.step()
    assert torch.isfinite(model[0].weight).all() and not torch.equal(model[0].weight, before)
