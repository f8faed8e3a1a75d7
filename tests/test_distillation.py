"""Mask distillation: where each loss term's gradient goes, the binary mask, the schedule."""
from __future__ import annotations

import pytest
import torch

from methods import StudentMethod
from models import build_model
from settings import DistillSettings, OptimSettings


def make_method(kd: str = "mask") -> StudentMethod:
    torch.manual_seed(0)
    model = build_model("student", arch="resnet18", pretrained=False, normalize="none")
    return StudentMethod(model, DistillSettings(kd=kd))


def batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixels": torch.rand(n, 3, 32, 64, generator=g), "target": torch.rand(n, generator=g) * 50,
            "teacher_feature": torch.randn(n, 512, generator=g)}


def grads(term: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)


def reaches(term: torch.Tensor, params: list[torch.nn.Parameter]) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(term, params))


def test_schedule_phases():
    method = make_method()
    assert [method.phase(e) for e in (1, 5, 6, 10, 11, 100)] == [
        "supervised", "supervised", "feature", "feature", "mask", "mask"]
    assert make_method("feature").phase(50) == "feature"
    assert make_method("none").phase(50) == "supervised"


def test_mask_phase_gradient_paths():
    method = make_method()
    method.model.train()
    trunk = list(method.model.backbone.parameters())
    head = list(method.model.head.parameters())
    policy = list(method.policy.parameters())
    b = batch()
    terms = method.loss_terms(b["pixels"], b["target"], b["teacher_feature"], epoch=11)
    assert set(terms) == {"score", "mixed", "imitation", "mask_teacher_share"}
    # The mixed-feature loss reaches the policy net and the head, not the student's trunk.
    assert reaches(terms["mixed"], policy) and reaches(terms["mixed"], head)
    assert not reaches(terms["mixed"], trunk)
    # The imitation loss reaches the trunk, and neither the policy nor the head.
    assert reaches(terms["imitation"], trunk)
    assert not reaches(terms["imitation"], policy) and not reaches(terms["imitation"], head)
    # The supervised loss trains trunk and head but not the policy.
    assert reaches(terms["score"], trunk) and not reaches(terms["score"], policy)


def test_mask_is_binary_and_mixes_channels():
    method = make_method()
    b = batch()
    f_s = torch.randn(3, 512)
    mask = method.policy(f_s, b["teacher_feature"])
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean() < 1
    from models.policy import mix

    mixed = mix(f_s, b["teacher_feature"], mask)
    expected = torch.where(mask.bool(), b["teacher_feature"], f_s)
    assert torch.equal(mixed, expected)


def test_feature_phase_uses_teacher_feature():
    method = make_method("feature")
    b = batch()
    terms = method.loss_terms(b["pixels"], b["target"], b["teacher_feature"], epoch=8)
    _, f_s = method.model(b["pixels"])
    assert terms["imitation"].item() == pytest.approx(((f_s - b["teacher_feature"]) ** 2).mean().item(), rel=1e-5)


def test_kd_none_never_builds_a_policy():
    method = make_method("none")
    assert method.policy is None
    assert set(method.nets()) == {"model"}
    assert len(method.param_groups(OptimSettings(lr=1e-3))) == 1
    b = batch()
    assert set(method.loss_terms(b["pixels"], b["target"], None, epoch=50)) == {"score"}


def test_policy_learning_rate_is_half():
    method = make_method()
    groups = method.param_groups(OptimSettings(lr=2e-4))
    assert [g["lr"] for g in groups] == [2e-4, 1e-4]


def test_mask_share_scalar():
    method = make_method()
    b = batch()
    _, scalars = method(b["pixels"], b["target"], b["teacher_feature"], epoch=20)
    assert 0.0 <= float(scalars["mask_teacher_share"]) <= 1.0
