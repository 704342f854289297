"""The side-network serving rules of ``server.engine.temporary``: routing, masking, distillation."""

from __future__ import annotations

import torch
from torch import nn

from server.engine.temporary import RoutedModule, distillation_loss


class Fixed(nn.Module):
    """A network that answers the same logits for every sample."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def test_the_most_confident_expert_answers_with_its_log_probabilities() -> None:
    main = Fixed([2.0, 1.0, 0.0, 0.0])  # top probability ~0.61
    confident = Fixed([0.0, 0.0, 5.0, 0.0])  # over its classes {2, 3}: ~0.99
    one_class = Fixed([9.0, 0.0, 0.1, 0.0])  # masked to its one class {3} it would be certain
    masks = torch.tensor([[False, False, True, True]])
    routed = RoutedModule(main, [confident], masks)(torch.zeros(3, 1))
    expected = torch.log_softmax(torch.tensor([5.0, 0.0]), dim=0)  # classes 2 and 3
    assert torch.isinf(routed[:, :2]).all() and torch.allclose(routed[:, 2:], expected.expand(3, -1))
    # A less confident side network leaves the answer to the main model, unchanged in its classes' order.
    masks = torch.tensor([[False, False, True, True]])
    routed = RoutedModule(main, [Fixed([0.0, 0.0, 0.1, 0.0])], masks)(torch.zeros(2, 1))
    assert torch.allclose(routed, torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, 0.0]), dim=0).expand(2, -1))
    # Confidence counts every output: a one-class side network is not certain of everything.
    routed = RoutedModule(main, [one_class], torch.tensor([[False, False, False, True]]))(torch.zeros(1, 1))
    assert routed.argmax(dim=1).item() == 0


def test_distillation_ignores_a_common_shift_and_the_other_classes() -> None:
    classes = torch.tensor([1, 2])
    teacher = torch.tensor([[-float("inf"), 3.0, 1.0, -float("inf")]])
    same = torch.tensor([[7.0, 13.0, 11.0, -4.0]])  # shifted by 10 on the task's classes; others anything
    assert distillation_loss(same, teacher, classes).item() < 1e-6
    other = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    assert distillation_loss(other, teacher, classes).item() > 0.1
    student = other.clone().requires_grad_(True)
    distillation_loss(student, teacher, classes).backward()
    assert student.grad is not None and student.grad[0, [0, 3]].abs().sum() == 0
    assert student.grad.abs().max() <= 2.0  # bounded (T · |p - q|), whatever the logit scale
