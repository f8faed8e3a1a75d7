"""Mixed precision that does not change the method: the mask's gradient clamp under fp16 loss scaling,
fp32 scores and features under bf16, --amp auto, and --deterministic (CPU autocast stands in for CUDA's)."""
from __future__ import annotations

import contextlib
import os

import torch
from torch.nn import functional as F

from kdoiqa import engine
from kdoiqa.methods import StudentMethod, current_loss_scale
from kdoiqa.models import build_model
from kdoiqa.models.teacher import NUM_FACES
from kdoiqa.settings import DistillSettings


def _student_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    method = StudentMethod(build_model("student", pretrained=False, normalize="none"),
                           DistillSettings(kd="mask", kd_warmup=0, kd_feature_epochs=0))
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.rand(4, 3, 32, 64, generator=g)
    target = torch.rand(4, generator=g) * 100  # raw 0-100 scores: large gradients reach the clamp
    teacher = torch.randn(4, 512, generator=g)
    return method, pixels, target, teacher


def _policy_gradient(method, pixels, target, teacher, *, scaler=None, autocast=None) -> torch.Tensor:
    method.train()
    method.zero_grad(set_to_none=True)
    if scaler is not None:
        method.use_grad_scaler(scaler)
    with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
        loss, _ = method(pixels, target, teacher, epoch=5)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grads = [p.grad.detach().float().clone() for p in method.policy.parameters()]
    if scaler is not None:
        inv = 1.0 / float(scaler.get_scale())
        grads = [g * inv for g in grads]
    return torch.cat([g.flatten() for g in grads])


def test_loss_scaling_does_not_change_the_mask_gradient():
    """One scaled fp16 step's policy gradient (unscaled afterwards) against the fp32 step's: the
    straight-through clamp must act on true gradients, not on gradients x 65536."""
    method, pixels, target, teacher = _student_and_batch()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    reference = _policy_gradient(method, pixels, target, teacher)
    assert reference.abs().max() > 0
    method.load_state_dict(state)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = _policy_gradient(method, pixels, target, teacher, scaler=scaler)
    # The same computation in fp32 (no autocast) with the scale: equal up to rounding.
    cosine = F.cosine_similarity(scaled, reference, dim=0)
    assert cosine > 0.9999, float(cosine)
    torch.testing.assert_close(scaled, reference, rtol=1e-3, atol=1e-6 * float(reference.abs().max()))
    # And under fp16 autocast (as on a GPU), at a scale where fp16 does not overflow on 0-100 targets (the
    # GradScaler backs off to such a scale by itself): close to the fp32 gradient.
    method.load_state_dict(state)
    fp16 = _policy_gradient(method, pixels, target, teacher, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8),
                            autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    assert torch.isfinite(fp16).all()
    assert F.cosine_similarity(fp16, reference, dim=0) > 0.99
    assert fp16.norm() / reference.norm() > 0.9


def test_fp16_clamp_at_the_default_loss_scale_is_finite():
    """GradScaler starts at 65536, which is fp16's infinity: the clamp's bound and the straight-through
    gradient are computed in fp32 (the policy runs in fp32 under autocast), so the first step's policy
    gradient is finite and the step is not skipped."""
    method, pixels, target, teacher = _student_and_batch()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    reference = _policy_gradient(method, pixels, target, teacher)
    method.load_state_dict(state)
    scaler = torch.amp.GradScaler("cpu")  # the default init_scale, 2**16
    assert scaler.get_scale() == 2.0**16
    fp16 = _policy_gradient(method, pixels, target, teacher, scaler=scaler,
                            autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    assert torch.isfinite(fp16).all()
    assert F.cosine_similarity(fp16, reference, dim=0) > 0.99
    # The clamp itself at that scale: an overflowed upstream gradient becomes the bound, not inf.
    from kdoiqa.models.policy import binarize

    probs = torch.full((3,), 0.7, requires_grad=True)
    bound = torch.tensor(2.0**16)
    binarize(probs, lambda: bound).backward(torch.tensor([float("inf"), -1e30, 5.0]))
    assert probs.grad.tolist() == [2.0**16, -(2.0**16), 5.0]


def test_the_loss_scale_is_read_from_the_scaler_without_a_host_sync():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))
    scale = current_loss_scale(scaler)()
    assert isinstance(scale, torch.Tensor) and float(scale) == 2.0**10


def test_bf16_autocast_keeps_scores_and_features_in_fp32():
    """The head and the projector run in fp32 under autocast: scores differ from the fp32 head applied to the
    same feature by < 1e-3 relative (bf16 would round a 0-100 score to steps of 0.125-0.5)."""
    torch.manual_seed(0)
    for kind, shape in (("student", (3, 3, 32, 64)), ("teacher", (3, NUM_FACES, 3, 32, 32))):
        model = build_model(kind, pretrained=False).eval()
        with torch.no_grad():
            model.head.bias.fill_(57.3)  # a score on the 0-100 scale
            pixels = torch.rand(*shape)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                score, feature = model(pixels)
            assert score.dtype == torch.float32 and feature.dtype == torch.float32, kind
            exact = F.linear(feature.double(), model.head.weight.double(), model.head.bias.double()).squeeze(-1)
            assert ((score.double() - exact).abs() / exact.abs()).max() < 1e-3, kind
            assert len(set(score.tolist())) == len(score)  # not collapsed onto a coarse grid


def test_amp_auto_is_bf16_only_on_gpus_that_compute_it_natively(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert engine.resolve_amp("auto", cpu) == "none"
    assert engine.resolve_amp("bf16", cpu) == "bf16" and engine.resolve_amp("none", cpu) == "none"
    for capability, expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "none"), ((6, 1), "none")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert engine.resolve_amp("auto", gpu) == expected, capability  # H100 / A100 / T4 / P100
    assert engine.resolve_amp("fp16", gpu) == "fp16"


def test_deterministic_run_is_strict_inside_and_leaves_no_trace(tiny_db, tmp_path, monkeypatch, capsys):
    """--deterministic holds during the run (strict algorithms, cuBLAS workspace) and is undone after it:
    a later run, or an API user, in the same process is not deterministic."""
    import teacher_train

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real = engine.train_one_epoch

    def recording(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", recording)
    assert not torch.are_deterministic_algorithms_enabled()
    common = ["--database", str(tiny_db), "--folds", "2", "--fold", "0", "--epochs", "1", "--no-pretrained",
              "--face-size", "32", "--workers", "0", "--no-progress"]
    teacher_train.main([*common, "--deterministic", "--out", str(tmp_path / "run")])
    assert seen == [(True, False, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert "precision fp32 (--amp auto), deterministic algorithms" in capsys.readouterr().out
    teacher_train.main([*common, "--out", str(tmp_path / "later")])
    assert seen[1] == (False, False, None)


def test_fused_adam_step_equals_the_plain_one():
    """The accelerator's optimiser (fused Adam) against the plain one: one step, equal to rounding (the
    step moves weights by ~2e-4, the lr; the two differ by < 1e-6)."""
    from kdoiqa.accelerator import ACCELERATOR
    from kdoiqa.settings import OptimSettings

    method, pixels, target, teacher = _student_and_batch()
    start = {k: v.clone() for k, v in method.state_dict().items()}
    after = []
    for accelerated in (False, True):
        method.load_state_dict(start)
        with ACCELERATOR.simulated() if accelerated else contextlib.nullcontext():
            optimizer = engine.build_optimizer(method, OptimSettings(), torch.device("cpu"))
        assert bool(optimizer.defaults.get("fused")) == accelerated
        optimizer.zero_grad(set_to_none=True)
        loss, _ = method(pixels, target, teacher, epoch=5)
        loss.backward()
        optimizer.step()
        after.append({k: v.clone() for k, v in method.state_dict().items()})
    moved = max(float((after[0][k].float() - start[k].float()).abs().max()) for k in start)
    assert moved > 1e-5
    for name in start:
        torch.testing.assert_close(after[1][name], after[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_steps_with_fused_adam_read_nothing_on_the_host(monkeypatch):
    """Under fp16 loss scaling, plain Adam makes the GradScaler read its overflow flag on the host every
    step (`.item()`); fused Adam takes it on the device: no `.item()` in a step."""
    from kdoiqa.accelerator import ACCELERATOR
    from kdoiqa.settings import OptimSettings

    method, pixels, target, teacher = _student_and_batch()
    with ACCELERATOR.simulated():
        optimizer = engine.build_optimizer(method, OptimSettings(), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    method.use_grad_scaler(scaler)
    autocast = engine.autocast_for("fp16", torch.device("cpu"))
    engine.train_step(method, optimizer, scaler, autocast, {"pixels": pixels, "teacher_feature": teacher, "weight": 1.0},
                      target, 5)  # the first step sets up the scaler's state
    calls = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real_item(self))
    engine.train_step(method, optimizer, scaler, autocast, {"pixels": pixels, "teacher_feature": teacher, "weight": 1.0},
                      target, 5)
    assert calls == []


def test_global_pool_under_determinism_is_the_same_pool():
    """The deterministic CUDA path of the backbone pools by a mean: the same values as AdaptiveAvgPool2d."""
    x = torch.randn(2, 512, 7, 13, dtype=torch.float64)
    torch.testing.assert_close(x.mean(dim=(2, 3)), torch.flatten(torch.nn.AdaptiveAvgPool2d((1, 1))(x), 1))
