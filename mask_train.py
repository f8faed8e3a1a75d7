"""ERP student of KD-OIQA, distilled from the cached cube-face teacher features.

The student sees only the equirectangular image (default 1024x512): backbone -> pooled feature
f_s -> linear head. With `--kd mask` (the paper's mask distillation) a policy network reads
cat(f_s, f_t) and picks, channel by channel, the teacher's or the student's feature; the
student's head must score the mix, and the student learns to imitate it:

    epochs 1..W            L = MSE(y_hat, y)                                   (W = --kd-warmup)
    next F epochs          L = MSE(y_hat, y) + w * MSE(f_s, f_t)               (F = --kd-feature-epochs)
    afterwards             L = MSE(y_hat, y) + MSE(head(f_m), y) + w * MSE(f_s, f_m.detach())
                           f_m = (1 - m) * f_s.detach() + m * f_t,  m = policy(f_s, f_t) in {0, 1}

`--kd feature` keeps the plain feature loss after the warm-up; `--kd none` is the paper's
baseline_train.py (no teacher). At inference the student needs no viewports.

    python mask_train.py --database OIQA --features features/OIQA              # mask KD, paper defaults
    python mask_train.py --database OIQA --kd none                              # the baseline
    python mask_train.py --database data/Synthetic --kd mask --epochs 12 --no-pretrained --erp-size 128x64
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import engine
from common import UserError, run_cli, training_parser
from dataset import database_key, load_database, resolve_folds
from models import PolicyNet, build_model
from models.policy import mix
from teacher_features import fold_feature_path, load_features, peek_features


class StudentMethod(engine.Method):
    """The ERP student: supervised only (`--kd none`) or with the distillation schedule."""

    view = "erp"
    kind = "student"

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        super().__init__(model)
        self.kd, self.weight = args.kd, args.kd_weight
        self.warmup, self.feature_epochs = args.kd_warmup, args.kd_feature_epochs
        self.policy = PolicyNet(model.feature_dim) if self.kd == "mask" else None
        self._mask_sum, self._mask_count = 0.0, 0

    def modules(self) -> dict[str, nn.Module]:
        mods = {"model": self.model}
        if self.policy is not None:
            mods["policy"] = self.policy
        return mods

    def param_groups(self, args: argparse.Namespace) -> list[dict]:
        groups = [{"params": list(self.model.parameters()), "lr": args.lr}]
        if self.policy is not None:
            groups.append({"params": list(self.policy.parameters()), "lr": args.lr * args.policy_lr_scale})
        return groups

    def phase(self, epoch: int) -> str:
        if self.kd == "none" or epoch <= self.warmup:
            return "supervised"
        if self.kd == "feature" or epoch <= self.warmup + self.feature_epochs:
            return "feature"
        return "mask"

    def loss_terms(self, batch: dict, epoch: int) -> dict[str, torch.Tensor]:
        """The loss terms of this epoch's phase: score, and imitation / mixed when distilling."""
        score, f_s = self.forward(batch)
        f_s = f_s.float()
        terms = {"score": nn.functional.mse_loss(score.float(), batch["target"])}
        phase = self.phase(epoch)
        if phase == "feature":
            terms["imitation"] = nn.functional.mse_loss(f_s, batch["teacher_feature"])
        elif phase == "mask":
            # The mixed-feature loss trains the policy and the head, never the trunk (f_s is
            # detached in the mix); the trunk learns from imitating the mix.
            f_t = batch["teacher_feature"]
            mask = self.policy(f_s, f_t)
            f_m = mix(f_s.detach(), f_t, mask)
            terms["mixed"] = nn.functional.mse_loss(self.model.head(f_m).squeeze(-1).float(), batch["target"])
            terms["imitation"] = nn.functional.mse_loss(f_s, f_m.detach())
            self._mask_sum = self._mask_sum + mask.detach().float().mean()  # read once per epoch
            self._mask_count += 1
        return terms

    def training_loss(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.loss_terms(batch, epoch)
        loss = terms["score"] + terms.get("mixed", 0.0) + self.weight * terms.get("imitation", 0.0)
        return loss, {f"loss_{name}": value.detach() for name, value in terms.items()}

    def epoch_scalars(self) -> dict[str, float]:
        if not self._mask_count:
            return {}
        share = float(self._mask_sum) / self._mask_count
        self._mask_sum, self._mask_count = 0.0, 0
        return {"mask_teacher_share": share}


def kd_parser() -> argparse.ArgumentParser:
    """Distillation flags, shared with crossdb_train.py."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("distillation")
    g.add_argument("--kd", choices=("mask", "feature", "none"), default="mask",
                   help="mask distillation (the paper), plain feature distillation, or none (the baseline)")
    g.add_argument("--features", type=Path, default=None, help="teacher feature folder (default features/<database>)")
    g.add_argument("--kd-warmup", type=int, default=5, help="supervised-only epochs first")
    g.add_argument("--kd-feature-epochs", type=int, default=5, help="epochs of feature imitation before the mask")
    g.add_argument("--kd-weight", type=float, default=0.2, help="weight of the imitation loss")
    g.add_argument("--policy-lr-scale", type=float, default=0.5, help="policy-net lr = lr x this (paper: 1e-4 = 2e-4/2)")
    return p


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=__doc__, parents=[training_parser(), kd_parser()],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def student_from_args(args: argparse.Namespace) -> nn.Module:
    return build_model("student", arch=args.arch, pretrained=not args.no_pretrained, weights_path=args.weights,
                       normalize=args.normalize)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.kd_warmup < 0 or args.kd_feature_epochs < 0:
        raise UserError("--kd-warmup and --kd-feature-epochs must be 0 or more")
    if not args.database:
        raise UserError("--database is required (a registered name or a folder holding meta.csv)")
    db = load_database(args.database, args.data_root)
    features_dir = args.features or Path("features") / database_key(db)
    rebuild = f"python feat_save.py --database {args.database} --run runs/teacher_train/{database_key(db)}/<run>"
    folds_file = args.folds_file
    if args.kd != "none":
        # The student must use the teacher's folds: its features of a test image were made by a
        # teacher that never trained on it.
        # Any fold's file carries the teacher's provenance; an out-of-range --fold is refused below.
        peek_fold = args.fold if args.fold is not None and fold_feature_path(features_dir, args.fold).is_file() else 0
        teacher = peek_features(fold_feature_path(features_dir, peek_fold), rebuild)
        folds_file = folds_file or teacher["teacher_args"].get("folds_path")
        rebuild = teacher.get("rebuild") or rebuild
    folds = resolve_folds(db, folds_file, seed=args.seed)
    args.folds_file = str(folds.path) if folds.path else folds_file
    run = engine.start_run("mask_train", args, db=db, folds=folds)

    # Every fold's cache is checked before any training starts.
    features = {} if args.kd == "none" else {
        k: load_features(fold_feature_path(features_dir, k), db, fold=k, test_images=folds.folds[k].test,
                         rebuild_hint=rebuild) for k in run.fold_ids}
    engine.train_folds(run, lambda fold, split: StudentMethod(student_from_args(args), args),
                       features_for_fold=features.get if features else None)


if __name__ == "__main__":
    run_cli(main)
