"""The paper's tables from a reproduction's runs: Table 1 (within each database: teacher, the no-KD
baseline, mask KD; SRCC and PLCC mean ± std over folds and seeds), the paired effect of mask KD over
the baseline with a 95% bootstrap interval, and the cross-database table; as Markdown and LaTeX. Each
says which fit its PLCC came after; a per-distortion mean over fewer folds than the runs have says how
many (an undefined per-distortion SRCC is left out, never counted as 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

# The authors' teacher: the 5-fold means of the SRCC / PLCC written in the names of their teacher
# checkpoints (feat_save.py and crossdb_feat.py of github.com/Aca4peop/KD-OIQA, which list them).
# Best epoch on each test fold, as their code selected it. Cross-database: |SRCC| (IQA-ODI is a DMOS).
PAPER_TEACHER = {"CVIQ": (0.942, 0.956), "OIQA": (0.935, 0.942), "IQA-ODI": (0.908, 0.884)}
PAPER_CROSS_TEACHER = {("CVIQ", "OIQA"): (0.543, 0.578), ("CVIQ", "IQA-ODI"): (0.592, 0.624),
                       ("OIQA", "CVIQ"): (0.877, 0.906), ("OIQA", "IQA-ODI"): (0.665, 0.657),
                       ("IQA-ODI", "CVIQ"): (0.797, 0.834), ("IQA-ODI", "OIQA"): (0.504, 0.564)}
MODELS = (("teacher", "teacher (cube faces)"), ("none", "baseline (ERP, no KD)"), ("mask", "KD-OIQA (ERP, mask KD)"))
MIN_PAIRS = 5  # fewer paired folds give no bootstrap interval worth printing

# What pdflatex cannot take as it is (or takes as markup) in the text written into tables.tex.
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "→": r"$\rightarrow$",
        "±": r"$\pm$", "–": "--", "≥": r"$\geq$", "≤": r"$\leq$"}


def tex_escape(text: str) -> str:
    """`text` as LaTeX source that pdflatex typesets as written (ASCII only)."""
    out = "".join(_TEX.get(ch, ch) for ch in str(text))
    if not out.isascii():
        out = "".join(ch if ch.isascii() else "?" for ch in out)
    return out


def fold_rows(run_dir: Path) -> pd.DataFrame:
    """The per-fold rows of a finished run's results.csv."""
    table = pd.read_csv(run_dir / "results.csv", dtype={"fold": str})
    return table[~table["fold"].isin(["mean", "std", "median"])].assign(fold=lambda t: t["fold"].astype(int))


def bootstrap_interval(values: np.ndarray, *, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (resampling the values with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return (float("nan"), float("nan"))
    means = np.random.default_rng(seed).choice(values, size=(draws, values.size), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class Cell:
    values: np.ndarray
    of: int | None = None   # folds the values could have come from (None: as many as there are values)

    def text(self, tex: bool = False) -> str:
        count = f" ({self.values.size} of {self.of} folds)" if self.of is not None and self.of != self.values.size else ""
        if not self.values.size:
            return "n/a" + count if count else "–"
        std = f"{self.values.std(ddof=1):.3f}" if self.values.size > 1 else "n/a"
        return f"{self.values.mean():.3f} ± {std}{count}"


def fit_text(tables: list[pd.DataFrame]) -> str:
    """Which fit the PLCC of these runs' folds came after (`fit_requested` of results.csv), and in how many
    folds a fallback was used instead; "" when no run records it."""
    requested = sorted({str(v) for t in tables if "fit_requested" in t for v in t["fit_requested"].dropna()})
    if not requested:
        return ""
    folds = sum(len(t) for t in tables)
    fallbacks = sum(int(t["fit_fallback"].notna().sum()) for t in tables if "fit_fallback" in t)
    names = {"paper": "paper fit_function", "logistic4": "logistic4 (ours)"}
    text = " / ".join(names.get(r, r) for r in requested)
    return text + (f", fallback in {fallbacks} of {folds} folds" if fallbacks else "")


def _tabular(header: list[str], rows: list[list[str]], tex: bool) -> str:
    if tex:
        lines = [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\hline",
                 " & ".join(map(tex_escape, header)) + r" \\", r"\hline"]
        lines += [" & ".join(map(tex_escape, row)) + r" \\" for row in rows]
        return "\n".join(lines + [r"\hline", r"\end{tabular}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def within_tables(runs: dict[tuple[str, str, int], Path], databases: list[str], protocol: str,
                  tex: bool = False) -> tuple[str, str, list[dict]]:
    """Table 1 and the paired-effect table of one protocol. `runs` maps (database, model, seed) to run
    folders; model is teacher, none or mask. Returns (table 1, effect table, effect records)."""
    header = ["model"] + [f"{db} {m}" for db in databases for m in ("SRCC", "PLCC")]
    rows = []
    for model, label in MODELS:
        row = [label]
        for db in databases:
            found = [fold_rows(path) for (d, m, _), path in runs.items() if d == db and m == model]
            for metric in ("srcc", "plcc"):
                row.append(Cell(np.concatenate([f[metric].to_numpy() for f in found]) if found else np.zeros(0)).text(tex))
        rows.append(row)
    if any(db in PAPER_TEACHER for db in databases):  # the paper's databases only
        paper = ["teacher, the authors' (checkpoint names)"]
        for db in databases:
            paper += [f"{v:.3f}" for v in PAPER_TEACHER[db]] if db in PAPER_TEACHER else ["–", "–"]
        rows.append(paper)
    fits = [fit_text([fold_rows(path) for (d, _, _), path in runs.items() if d == db]) for db in databases]
    if any(fits):
        rows.append(["PLCC after"] + [cell for fit in fits for cell in ("", fit or "–")])
    effect_rows, records = [], []
    for db in databases:
        diffs = {"srcc": [], "plcc": []}
        seeds = sorted({s for (d, m, s) in runs if d == db})
        for seed in seeds:
            mask, none = runs.get((db, "mask", seed)), runs.get((db, "none", seed))
            if mask is None or none is None:
                continue
            a, b = fold_rows(mask).set_index("fold"), fold_rows(none).set_index("fold")
            for metric in diffs:
                diffs[metric] += (a[metric] - b[metric]).dropna().tolist()
        record = {"protocol": protocol, "database": db, "pairs": len(diffs["srcc"])}
        cells = [db, str(len(diffs["srcc"]))]
        for metric in ("srcc", "plcc"):
            values = np.asarray(diffs[metric])
            low, high = bootstrap_interval(values) if values.size >= MIN_PAIRS else (float("nan"), float("nan"))
            mean = float(values.mean()) if values.size else float("nan")
            record.update({f"d_{metric}": mean, f"d_{metric}_low": low, f"d_{metric}_high": high})
            if not values.size:
                cells.append("–")
            elif values.size < MIN_PAIRS:
                cells.append(f"{mean:+.3f} [no interval: {values.size} pair(s), {MIN_PAIRS} needed]")
            else:
                cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        effect_rows.append(cells)
        records.append(record)
    effect = _tabular(["database", "paired folds", "Δ SRCC [95% CI]", "Δ PLCC [95% CI]"], effect_rows, tex)
    return _tabular(header, rows, tex), effect, records


def distortion_table(runs: dict[tuple[str, str, int], Path], databases: list[str], tex: bool = False) -> str | None:
    """SRCC per distortion type (mean ± std over folds and seeds) of each database and model, from the
    `srcc_<type>` columns of results.csv; None when no run has them (no `distortion` in meta.csv)."""
    rows = []
    for db in databases:
        for model, label in MODELS:
            found = [fold_rows(path) for (d, m, _), path in runs.items() if d == db and m == model]
            columns = sorted({c for f in found for c in f.columns if c.startswith("srcc_")})
            if columns:
                folds = sum(len(f) for f in found)
                rows.append((db, label, {c[5:]: Cell(np.concatenate([f[c].dropna().to_numpy() for f in found if c in f]),
                                                     of=folds) for c in columns}))
    if not rows:
        return None
    kinds = sorted({k for _, _, cells in rows for k in cells})
    body = [[db, label, *(cells[k].text(tex) if k in cells else "–" for k in kinds)] for db, label, cells in rows]
    return _tabular(["database", "model", *(f"{k} SRCC" for k in kinds)], body, tex)


def cross_table(runs: dict[tuple[str, str, str, int], Path], tex: bool = False) -> str:
    """Rows: trained on A, tested on B; columns: each model's SRCC / PLCC (mean ± std over seeds), and the
    authors' teacher. `runs` maps (A, B, model, seed) to run folders."""
    pairs = sorted({(a, b) for a, b, _, _ in runs})
    header = ["train → test"] + [f"{label.split(' (')[0]} {m}" for _, label in MODELS for m in ("SRCC", "PLCC")]
    authors = any(pair in PAPER_CROSS_TEACHER for pair in pairs)
    if authors:
        header += ["authors' teacher SRCC", "PLCC"]
    rows = []
    for a, b in pairs:
        row = [f"{a} → {b}"]
        for model, _ in MODELS:
            found = [fold_rows(p) for (x, y, m, _), p in runs.items() if (x, y, m) == (a, b, model)]
            for metric in ("srcc", "plcc"):
                row.append(Cell(np.concatenate([f[metric].to_numpy() for f in found]) if found else np.zeros(0)).text(tex))
        if authors:
            row += [f"{v:.3f}" for v in PAPER_CROSS_TEACHER[(a, b)]] if (a, b) in PAPER_CROSS_TEACHER else ["–", "–"]
        rows.append(row)
    fit = fit_text([fold_rows(p) for p in runs.values()])
    if fit:
        rows.append([f"PLCC after: {fit}"] + [""] * (len(header) - 1))
    return _tabular(header, rows, tex)
