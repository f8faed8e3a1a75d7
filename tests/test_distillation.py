"""Mask distillation: where each loss term's gradient goes, the binary mask, the schedule."""
from __future__ import annotations

import pytest
import torch

from kdoiqa.methods import StudentMethod
from kdoiqa.models import build_model
from kdoiqa.settings import DistillSettings, OptimSettings


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
    from kdoiqa.models.policy import mix

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


# ----------------------------------------------------------------------------------------------
# Value by value: each loss term of each phase, and the total, against a hand computation.

def by_hand(method: StudentMethod, b: dict, phase: str) -> dict[str, torch.Tensor]:
    """The paper's losses written out: f_m = torch.where(mask, f_t, f_s), the weight 0.2 on imitation only."""
    model, y, f_t = method.model, b["target"], b["teacher_feature"]
    f_s = model.backbone(model.norm(b["pixels"]))          # ResNet-18: the pooled 512-d feature is f_s
    out = {"score": ((model.head(f_s).squeeze(-1) - y) ** 2).mean()}
    if phase == "feature":
        out["imitation"] = ((f_s - f_t) ** 2).mean()
        out["total"] = out["score"] + 0.2 * out["imitation"]
    elif phase == "mask":
        policy = method.policy
        mask = torch.sigmoid(policy.fc2(policy.fc1(torch.cat([f_s, f_t], dim=-1)))) > 0.5
        f_m = torch.where(mask, f_t, f_s)                    # teacher channels where the mask is 1
        out["mixed"] = ((model.head(f_m).squeeze(-1) - y) ** 2).mean()
        out["imitation"] = ((f_s - f_m) ** 2).mean()
        out["share"] = mask.float().mean()
        out["total"] = out["score"] + out["mixed"] + 0.2 * out["imitation"]
    else:
        out["total"] = out["score"]
    return out


@pytest.mark.parametrize("epoch,phase", [(1, "supervised"), (8, "feature"), (11, "mask")])
def test_loss_terms_equal_a_hand_computation(epoch, phase):
    method = make_method()
    method.eval()  # one set of BatchNorm statistics for both computations
    b = batch(4)
    with torch.no_grad():
        expected = by_hand(method, b, phase)
        loss, scalars = method(b["pixels"], b["target"], b["teacher_feature"], epoch=epoch)
    assert method.phase(epoch) == phase
    torch.testing.assert_close(loss, expected["total"], rtol=1e-6, atol=1e-5)
    names = {"score", "imitation", "mixed"} & set(expected)
    assert {k for k in scalars if k.startswith("loss_")} == {f"loss_{n}" for n in names}
    for name in names:
        torch.testing.assert_close(scalars[f"loss_{name}"], expected[name], rtol=1e-6, atol=1e-5)
    if phase == "mask":
        assert 0.1 < float(expected["share"]) < 0.9  # a real mix: a swapped mix would give other values
        assert float(scalars["mask_teacher_share"]) == pytest.approx(float(expected["share"]), abs=1e-7)


def test_kd_weight_scales_the_imitation_term_only():
    b = batch(3)
    for weight in (0.2, 1.0, 3.0):
        method = StudentMethod(make_method().model, DistillSettings(kd="mask", kd_weight=weight))
        method.eval()
        with torch.no_grad():
            loss, s = method(b["pixels"], b["target"], b["teacher_feature"], epoch=11)
        torch.testing.assert_close(loss, s["loss_score"] + s["loss_mixed"] + weight * s["loss_imitation"],
                                   rtol=1e-6, atol=1e-4)
        assert float(s["loss_imitation"]) > 1e-3 and float(s["loss_mixed"]) > 1e-3
