"""The chunked hypernetwork of ``uncle``: layout, chunking, hyperfan-in statistics, sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from server.engine.backbones import build_backbone
from server.engine.training import seeded_rng
from server.engine.uncle import ChunkedHypernetwork, TargetLayout, auto_chunk_size


class _Toy(nn.Module):
    """A small module with every kind of parameter the layout distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(3)
        self.layer_norm = nn.LayerNorm(12)
        self.linear = nn.Linear(12, 4)
        self.temperature = nn.Parameter(torch.tensor([0.5, 1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))  # [n, 3, 2, 2]
        h = self.layer_norm(h.flatten(1))  # [n, 12]
        return self.linear(h) * self.temperature.mean()


def _hypernetwork(module: nn.Module, seed: int = 0, chunk_size: int = 0) -> ChunkedHypernetwork:
    return ChunkedHypernetwork(
        TargetLayout.from_module(module), chunk_size=chunk_size, generator=torch.Generator().manual_seed(seed)
    )


def _backbone(name: str) -> nn.Module:
    shape = (3, 32, 32) if name.startswith("resnet") else (1, 8, 8)
    with seeded_rng(0):
        return build_backbone(name, shape, 10)


def test_layout_covers_every_parameter_contiguously_with_its_role() -> None:
    toy = _Toy()
    layout = TargetLayout.from_module(toy)
    assert [s.name for s in layout.slices] == [name for name, _ in toy.named_parameters()]
    assert layout.numel == sum(p.numel() for p in toy.parameters())
    assert [s.start for s in layout.slices] == [0, *(s.stop for s in layout.slices[:-1])]
    by_name = {s.name: s for s in layout.slices}
    assert by_name["conv.weight"].role == "weight" and by_name["conv.weight"].fan_in == 2 * 3 * 3
    assert by_name["conv.weight"].scale == pytest.approx(math.sqrt(2 / 18))
    assert by_name["conv.bias"].role == "bias" and by_name["conv.bias"].fan_in == 18
    assert by_name["conv.bias"].scale == pytest.approx(math.sqrt(1 / (3 * 18)))
    assert (by_name["norm.weight"].role, by_name["norm.weight"].offset) == ("norm_weight", 1.0)
    assert (by_name["norm.bias"].role, by_name["norm.bias"].offset) == ("norm_bias", 0.0)
    assert by_name["layer_norm.weight"].role == "norm_weight"
    assert by_name["linear.weight"].fan_in == 12
    other = by_name["temperature"]
    assert other.role == "other"
    assert other.offset == pytest.approx(1.0) and other.scale == pytest.approx(torch.tensor([0.5, 1.5]).std().item())


def test_unflatten_keeps_each_tensor_in_its_own_row_major_layout() -> None:
    # The authors' code reshaped chunks without transposing; here element k of a tensor is raw element start + k.
    toy = _Toy()
    layout = TargetLayout.from_module(toy)
    raw = torch.arange(layout.numel, dtype=torch.float32)
    parameters = layout.unflatten(raw)
    for item in layout.slices:
        expected = raw[item.start : item.stop].reshape(item.shape) * item.scale + item.offset
        assert torch.equal(parameters[item.name], expected), item.name
        assert parameters[item.name].shape == dict(toy.named_parameters())[item.name].shape
    weight = parameters["linear.weight"]  # [4, 12]
    start = layout.slices[[s.name for s in layout.slices].index("linear.weight")].start
    assert weight[1, 0] == pytest.approx((start + 12) * math.sqrt(2 / 12))  # row 1 starts 12 elements later
    assert torch.allclose(layout.flatten(parameters), raw, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError):
        layout.unflatten(raw[:-1])


def test_generated_parameters_run_the_module_through_functional_call() -> None:
    toy = _Toy()
    hypernetwork = _hypernetwork(toy, chunk_size=16)
    assert hypernetwork.num_chunks == math.ceil(hypernetwork.layout.numel / 16)
    embeddings = torch.randn(3, 32)
    raw = hypernetwork(embeddings)
    assert raw.shape == (3, hypernetwork.layout.numel)
    parameters = hypernetwork.generate(embeddings[0])
    assert torch.allclose(hypernetwork.layout.flatten(parameters), raw[0], atol=1e-4)
    buffers = dict(toy.named_buffers())
    toy.eval()
    logits = functional_call(toy, {**parameters, **buffers}, (torch.randn(5, 2, 2, 2),))
    assert logits.shape == (5, 4) and torch.isfinite(logits).all()
    # Different task embeddings generate different networks.
    assert not torch.allclose(raw[0], raw[1])


def test_selected_chunks_are_the_chunks_of_the_whole_network() -> None:
    hypernetwork = _hypernetwork(_Toy(), chunk_size=16)
    embeddings = torch.randn(3, 32)
    every = hypernetwork.all_chunks(embeddings)  # [3, C, 16]
    assert every.shape == (3, hypernetwork.num_chunks, 16)
    valid = hypernetwork.valid_mask()
    flat = every.reshape(3, -1)[:, valid.reshape(-1) > 0]
    assert torch.allclose(flat, hypernetwork(embeddings), atol=1e-5)
    assert int(valid.sum()) == hypernetwork.layout.numel and valid[:-1].all()
    tasks = torch.tensor([2, 0, 2, 1])
    chunks = torch.tensor([0, hypernetwork.num_chunks - 1, 3, 3])
    assert torch.allclose(hypernetwork.chunks(embeddings, tasks, chunks), every[tasks, chunks], atol=1e-5)


def test_gradients_reach_every_part_of_phi_and_the_task_embedding() -> None:
    toy = _Toy()
    hypernetwork = _hypernetwork(toy, chunk_size=16)
    embedding = torch.randn(32, requires_grad=True)
    parameters = hypernetwork.generate(embedding)
    toy.train()
    loss = functional_call(toy, {**parameters, **dict(toy.named_buffers())}, (torch.randn(4, 2, 2, 2),)).square().sum()
    loss.backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    for name, parameter in hypernetwork.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Chunk embeddings are parameters of φ (the authors' code never trained them).
    assert "chunk_embeddings" in dict(hypernetwork.named_parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_hyperfan_in_generates_kaiming_statistics_in_every_layer(name: str) -> None:
    backbone = _backbone(name)
    hypernetwork = _hypernetwork(backbone)
    embedding = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parameters = hypernetwork.generate(embedding)
    weights = [s for s in hypernetwork.layout.slices if s.role == "weight"]
    assert len(weights) >= 3
    for item in weights:
        values = parameters[item.name]
        kaiming = 2.0 / item.fan_in
        ratio = values.var().item() / kaiming
        assert 0.5 <= ratio <= 2.0, f"{name} {item.name}: variance {ratio:.2f} x Kaiming's 2/fan_in"
        assert abs(values.mean().item()) <= 0.5 * values.std().item(), f"{name} {item.name}: not centred"
    for item in hypernetwork.layout.slices:
        values = parameters[item.name]
        if item.role == "norm_weight":
            assert values.mean().item() == pytest.approx(1.0, abs=0.1)
        if item.role == "bias" and item.numel >= 64:
            assert 0.25 <= values.var().item() * 3 * item.fan_in <= 4.0, item.name


def test_hypernetwork_is_smaller_than_the_resnet18_it_generates() -> None:
    backbone = _backbone("resnet18")
    target = sum(p.numel() for p in backbone.parameters())
    hypernetwork = _hypernetwork(backbone)
    assert hypernetwork.layout.numel == target
    # Large chunk count, chunk embeddings carry the position: about a tenth of the target (the authors': ~11x).
    assert hypernetwork.parameter_count() <= 0.2 * target
    assert hypernetwork.chunk_size == auto_chunk_size(target, 64, (128, 256, 512), 32) == 1024


def test_auto_chunk_size_balances_size_and_time() -> None:
    hidden = (128, 256, 512)
    trunk_per_chunk = 64 * 128 + 128 * 256 + 256 * 512
    # Small targets: the trunk's cost per chunk decides (trunk / hidden[-1] = 336 -> 256).
    assert auto_chunk_size(85_002, 64, hidden, 32) == 2 ** round(math.log2(trunk_per_chunk / 512)) == 256
    # Large targets: the size optimum sqrt(32 * numel / 512) decides.
    assert auto_chunk_size(23_528_522, 64, hidden, 32) == 2 ** round(math.log2(math.sqrt(32 * 23_528_522 / 512)))
    sizes = [auto_chunk_size(n, 64, hidden, 32) for n in (10, 10**4, 10**6, 10**8)]
    assert sizes == sorted(sizes) and min(sizes) >= 8
    with pytest.raises(ValueError):
        auto_chunk_size(0, 64, hidden, 32)


def test_construction_is_deterministic_under_a_generator() -> None:
    toy = _Toy()
    first, second = _hypernetwork(toy, seed=3), _hypernetwork(toy, seed=3)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.head.weight, _hypernetwork(toy, seed=4).head.weight)
