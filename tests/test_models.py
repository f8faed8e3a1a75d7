"""Tests of models/: shapes, weight sharing, composition, normalisation, policy STE, weights IO."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdoiqa.common import UserError
from kdoiqa.models import (
    FACE_LAYOUT,
    BinarizeSTE,
    InputNorm,
    PolicyNet,
    StudentNet,
    TeacherNet,
    build_backbone,
    build_model,
    mix,
    model_from_config,
)
from kdoiqa.models.backbone import expected_weights_file


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def faces_batch(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 6, 3, size, size), dtype=torch.uint8)


def test_teacher_shapes_and_layout() -> None:
    model = TeacherNet(pretrained=False).eval()
    with torch.no_grad():
        score, feature = model(faces_batch())
    assert score.shape == (2,) and feature.shape == (2, 512)
    assert FACE_LAYOUT == ("F", "R", "BA", "L", "T", "BO") and model.num_faces == 6
    assert model.projector.in_features == 6 * 512 and model.head.in_features == 512
    assert all(hasattr(model, name) for name in ("backbone", "projector", "head", "norm"))
    with pytest.raises(UserError):
        model(torch.zeros(2, 5, 3, 32, 32))


def test_teacher_backbone_is_shared_across_faces() -> None:
    model = TeacherNet(pretrained=False).eval()
    faces = faces_batch()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        per_face = model.face_features(faces)
        permuted = model.face_features(faces[:, perm])
    assert per_face.shape == (2, 6, 512)
    torch.testing.assert_close(permuted, per_face[:, perm], rtol=1e-5, atol=1e-5)
    # One trunk: its parameter count appears once, not six times.
    trunk = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == trunk + 6 * 512 * 512 + 512 + 512 + 1


def test_teacher_equals_manual_composition() -> None:
    model = TeacherNet(pretrained=False, normalize="imagenet").eval()
    faces = faces_batch()
    with torch.no_grad():
        score, feature = model(faces)
        x = faces.float() / 255.0
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        pooled = [model.backbone((x[:, k] - mean) / std) for k in range(6)]
        manual_feature = model.projector(torch.cat(pooled, dim=1))
        manual_score = model.head(manual_feature).squeeze(1)
    torch.testing.assert_close(feature, manual_feature, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score, manual_score, rtol=1e-4, atol=1e-5)


def test_student_shapes_and_projection_only_when_needed() -> None:
    small = StudentNet(pretrained=False).eval()
    assert isinstance(small.proj, nn.Identity)
    erp = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        score, feature = small(erp)
    assert score.shape == (2,) and feature.shape == (2, 512)
    big = StudentNet(arch="resnet50", pretrained=False).eval()
    assert isinstance(big.proj, nn.Linear) and big.proj.weight.shape == (512, 2048)
    with torch.no_grad():
        score, feature = big(erp[:1, :, :32, :64])
    assert score.shape == (1,) and feature.shape == (1, 512)
    assert all(hasattr(small, name) for name in ("backbone", "proj", "head", "norm"))


def test_input_norm_uint8_float_and_imagenet_values() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    plain = InputNorm("none")
    torch.testing.assert_close(plain(images), images.float() / 255.0)
    torch.testing.assert_close(plain(images.float() / 255.0), images.float() / 255.0)
    imagenet = InputNorm("imagenet")
    torch.testing.assert_close(imagenet(images), imagenet(images.float() / 255.0))
    pixel = torch.tensor([128, 64, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = torch.tensor([(128 / 255 - 0.485) / 0.229, (64 / 255 - 0.456) / 0.224, (1.0 - 0.406) / 0.225])
    torch.testing.assert_close(imagenet(pixel).view(3), expected)
    # Works on the teacher's 5-D input too, channel by channel.
    five = torch.full((1, 6, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(imagenet(five)[0, 4, :, 0, 0], (1.0 - torch.tensor([0.485, 0.456, 0.406]))
                               / torch.tensor([0.229, 0.224, 0.225]))
    assert not InputNorm().state_dict()  # statistics stay out of checkpoints
    with pytest.raises(UserError):
        InputNorm("zscore")


def test_policy_mask_is_binary_and_mix() -> None:
    policy = PolicyNet(feature_dim=16, hidden=32)
    f_s, f_t = torch.randn(4, 16), torch.randn(4, 16)
    mask = policy(f_s, f_t)
    assert mask.shape == (4, 16)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(mask, (policy.probabilities(f_s, f_t) > 0.5).float())
    mixed = mix(f_s, f_t, mask)
    torch.testing.assert_close(mixed, torch.where(mask.bool(), f_t, f_s))
    torch.testing.assert_close(PolicyNet.mix(f_s, f_t, mask), mixed)
    # The paper's layout: Linear(2d -> hidden) -> Linear(hidden -> d), no activation between.
    assert [type(m) for m in policy.children()] == [nn.Linear, nn.Linear]
    assert policy.fc1.weight.shape == (32, 32) and policy.fc2.weight.shape == (16, 32)


def test_binarize_ste_gradient_is_clamped_upstream_gradient() -> None:
    probs = torch.tensor([0.1, 0.49, 0.51, 0.9, 0.7], requires_grad=True)
    out = BinarizeSTE.apply(probs)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    upstream = torch.tensor([-3.0, -0.25, 0.5, 2.0, 1.0])
    out.backward(upstream)
    torch.testing.assert_close(probs.grad, upstream.clamp(-1.0, 1.0))


def test_policy_detaches_student_feature() -> None:
    policy = PolicyNet(feature_dim=8, hidden=16)
    f_s = torch.randn(3, 8, requires_grad=True)
    f_t = torch.randn(3, 8, requires_grad=True)
    (policy(f_s, f_t) * torch.randn(3, 8)).sum().backward()
    assert f_s.grad is None
    assert f_t.grad is not None and policy.fc1.weight.grad is not None


def test_offline_download_failure_names_both_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as api

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as info:
        build_backbone("resnet18", pretrained=True)
    message = str(info.value)
    assert "--no-pretrained" in message and "--weights" in message
    assert "resnet18-f37072fd.pth" in message and expected_weights_file("resnet18") == "resnet18-f37072fd.pth"
    assert str(Path(torch.hub.get_dir())) in message
    assert "\n" not in message
    with pytest.raises(UserError, match="--no-pretrained"):
        StudentNet(pretrained=True)


def test_weights_path_round_trip(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-random.pth"
    torch.save(reference.state_dict(), path)
    backbone, channels = build_backbone("resnet18", pretrained=True, weights_path=path)  # no download
    assert channels == 512
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    loaded = backbone.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # Older torchvision files have no BatchNorm num_batches_tracked: still accepted.
    old_style = tmp_path / "resnet18-old.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}, old_style)
    old_backbone, _ = build_backbone("resnet18", pretrained=False, weights_path=old_style)
    assert torch.equal(old_backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    # Through the models as well.
    teacher = TeacherNet(pretrained=False, weights_path=path)
    assert torch.equal(teacher.backbone.conv1.weight, reference.conv1.weight)
    # Wrong architecture, missing file and a file that is not a state dict: one-line user errors.
    with pytest.raises(UserError, match="resnet34"):
        build_backbone("resnet34", weights_path=path)
    with pytest.raises(UserError, match="no such file"):
        build_backbone("resnet18", weights_path=tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        build_backbone("resnet18", weights_path=junk)
    with pytest.raises(UserError):
        build_backbone("vgg16", pretrained=False)


def test_model_from_config_round_trip() -> None:
    erp = torch.rand(1, 3, 32, 64)
    faces = faces_batch(1, 32)
    for model, x in ((TeacherNet(pretrained=False, normalize="none"), faces),
                     (StudentNet(pretrained=False, feature_dim=256), erp)):
        model.eval()
        config = json.loads(json.dumps(model.config()))  # plain types only
        rebuilt = model_from_config(config)
        assert type(rebuilt) is type(model) and rebuilt.config() == model.config()
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.eval()
        with torch.no_grad():
            for a, b in zip(model(x), rebuilt(x)):
                torch.testing.assert_close(a, b)
    student = build_model("student", arch="resnet18", pretrained=False, feature_dim=256)
    assert isinstance(student.proj, nn.Linear)  # 512 != 256
    with pytest.raises(UserError):
        build_model("critic")
    with pytest.raises(UserError):
        build_model("student", pretrained=False, depth=3)
    with pytest.raises(UserError):
        model_from_config({"arch": "resnet18"})
