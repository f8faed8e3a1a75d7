"""The package and its public API: `kdoiqa.load(path)` scores as predict.py does, from files, PIL images and
tensors; gradients reach an input; bad inputs are one clear error; the layout, the imports and `pip install -e .`."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_db
from PIL import Image

import kdoiqa
import mask_train
import predict
import teacher_train
from kdoiqa.api import InputError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-pretrained", "--workers", "0", "--no-progress", "--face-size", "16", "--erp-size", "32x16",
        "--batch-size", "4", "--epochs", "1", "--folds", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("api")
    db = make_tiny_db(work / "Tiny", contents=4, levels=2, seed=31)
    teacher_train.main(["--database", str(db), "--fold", "0", *FAST, "--out", str(work / "teacher")])
    mask_train.main(["--database", str(db), "--kd", "none", *FAST, "--out", str(work / "student")])
    images = sorted((db / "images").glob("*.png"))[:5]
    return {"db": db, "teacher": work / "teacher", "student": work / "student", "images": images, "work": work}


def predict_csv(target: Path, images: list[Path], out: Path) -> pd.DataFrame:
    code = predict.main([str(target), *map(str, images), "--csv", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    return pd.read_csv(out)


def test_api_scores_equal_predict_for_files_pil_and_tensors(trained):
    images = trained["images"]
    run = trained["student"]
    table = predict_csv(run, images, trained["work"] / "run.csv")  # a run folder: the mean over its folds
    metric = kdoiqa.load(run, "cpu")
    assert len(metric.models) == 2 and metric.kind == "student" and metric.database == "Tiny"
    assert metric.higher_is_better is True and metric.score_range[0] < metric.score_range[1]
    from_files = metric([str(p) for p in images])
    assert from_files.shape == (5,) and from_files.dtype == torch.float32
    np.testing.assert_allclose(from_files.numpy(), table["score"].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(metric.scores_per_model(images).numpy(), table[["fold0", "fold1"]].to_numpy(), atol=1e-4)
    pil = [Image.open(p) for p in images]
    torch.testing.assert_close(metric(pil), from_files)
    batch = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in images])
    torch.testing.assert_close(metric(batch), from_files)                   # a uint8 batch [B, 3, H, W]
    torch.testing.assert_close(metric(batch[0]), from_files[:1])            # one image [3, H, W]
    floats = metric(batch.float() / 255)                                    # float input: torch's resize
    assert (floats - from_files).abs().max() < 0.05 * (metric.score_range[1] - metric.score_range[0])
    assert metric.to("cpu") is metric


def test_api_teacher_fold_equals_predict(trained):
    images = trained["images"][:3]
    table = predict_csv(trained["teacher"] / "fold0", images, trained["work"] / "teacher.csv")
    metric = kdoiqa.load(trained["teacher"] / "fold0")
    assert metric.kind == "teacher" and len(metric.models) == 1
    np.testing.assert_allclose(metric(images).numpy(), table["score"].to_numpy(), atol=1e-4)


def test_a_gradient_reaches_the_input(trained):
    for target in (trained["student"] / "fold0", trained["teacher"] / "fold0"):
        metric = kdoiqa.load(target, "cpu")
        x = torch.rand(2, 3, 48, 96, requires_grad=True)
        metric(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, target
        assert all(p.grad is None for p in metric.parameters())  # the networks are frozen


def test_bad_inputs_are_one_clear_error(trained, tmp_path):
    metric = kdoiqa.load(trained["student"] / "fold0", "cpu")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    square = tmp_path / "square.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(square)
    cases = [(torch.rand(4, 48, 96), "[3, H, W]"), (torch.rand(2, 2), "[B, 3, H, W] or [3, H, W]"),
             (torch.rand(3, 40, 40), "40x40 is not a 2:1 equirectangular image"), (str(square), "40x40"),
             (str(text), "unreadable image"), (42, "cannot score a int"),
             (torch.zeros(3, 48, 96, dtype=torch.int32), "uint8 (0-255) or float (0-1)")]
    for item, message in cases:
        with pytest.raises(ValueError) as info:
            metric(item)
        assert message in str(info.value) and "\n" not in str(info.value), (item, str(info.value))
        assert isinstance(info.value, (InputError, kdoiqa.api.UserError))
    with pytest.raises(kdoiqa.api.UserError, match="no such checkpoint"):
        kdoiqa.load(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# The layout and the imports.

TOP_LEVEL = {"teacher_train.py", "feat_save.py", "mask_train.py", "teacher_crossdb_train.py", "crossdb_feat.py",
             "crossdb_train.py", "img_resize.py", "dataset.py", "dataset_cross.py", "predict.py", "reproduce.py",
             "demo.py", "make_synthetic_db.py", "models", "viewport", "features", "benchmarks", "tests", "kdoiqa",
             "README.md", "requirements.txt", "requirements-dev.txt", "Makefile", "pyproject.toml", ".ci", ".gitignore"}


def tracked() -> list[str]:
    return subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_top_level_lists_only_the_scripts_and_the_project_files():
    assert {name.split("/")[0] for name in tracked()} <= TOP_LEVEL


def test_a_clone_has_the_feature_cache_folder_with_its_readme_alone():
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "features"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == ["features/README.md"]
    readme = (REPO / "features" / "README.md").read_text()
    assert "<database key>/fold<k>.pt" in readme and "<key A>-to-<key B>/all.pt" in readme
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "features/CVIQ/fold0.pt", "features/notes.txt",
                              "features/README.md"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored == ["features/CVIQ/fold0.pt", "features/notes.txt"]


def test_a_checkout_maps_the_subpackages_to_the_folders_the_wheel_installs(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == kdoiqa.SUBPACKAGE_DIRS
    assert set(config["packages"]) == {"kdoiqa", *kdoiqa.SUBPACKAGE_DIRS}
    # From a folder with its own models/ and viewport/ (which must never be imported), the checkout on PYTHONPATH.
    for name in ("models", "viewport"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\'s own {name} was imported')\n")
    code = ("import json, sys, kdoiqa.models, kdoiqa.viewport.project, kdoiqa.models.teacher as t; "
            "print(json.dumps([kdoiqa.models.__file__, kdoiqa.viewport.project.__file__, t.TeacherNet.__module__, "
            "'models' in sys.modules or 'viewport' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    models_file, project_file, module, claimed = json.loads(proc.stdout)
    assert Path(models_file) == REPO / "models" / "__init__.py" and Path(project_file) == REPO / "viewport" / "project.py"
    assert module == "kdoiqa.models.teacher" and claimed is False


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_scripts_import_the_library_and_nothing_imports_in_a_loop():
    files = [REPO / name for name in tracked() if name.endswith(".py") and not name.startswith(("tests/", "benchmarks/"))]
    # models/ and viewport/ are the subpackages kdoiqa.models and kdoiqa.viewport (pyproject.toml's package-dir).
    module_of = {f: ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for f in files}
    module_of = {f: f"kdoiqa.{m}" if m.split(".")[0] in ("models", "viewport") else m for f, m in module_of.items()}
    modules = set(module_of.values())
    every_file = [REPO / name for name in tracked() if name.endswith(".py") and (REPO / name).is_file()]
    for path in every_file:  # the project claims one top-level name: nothing imports `models` or `viewport`
        claimed = {m for m in _imports(path) if m.split(".")[0] in ("models", "viewport")}
        assert not claimed, f"{path} imports {claimed} (write kdoiqa.models / kdoiqa.viewport)"
    scripts = {m for m in modules if "." not in m and (REPO / f"{m}.py").is_file()}
    graph = {module_of[f]: {m for m in _imports(f) if m in modules} - {module_of[f]} for f in files}
    for module, deps in graph.items():
        assert not deps & scripts, f"{module} imports the script(s) {deps & scripts}"
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in graph.get(module, ()):
            assert state.get(dep) != 1, f"import loop: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    # The library folders hold no command-line module (none that could import back into kdoiqa).
    for folder in ("kdoiqa", "models", "viewport"):
        for path in (REPO / folder).glob("*.py"):
            assert "__main__" not in path.read_text(), path


def test_the_library_takes_typed_values_and_patches_nothing_of_argparse():
    """No module of kdoiqa/ but its command-line layer, kdoiqa/cli.py, imports argparse or kdoiqa.cli (lazy
    imports inside functions too), and no file assigns to argparse.ArgumentParser.error (a patch for the whole
    process)."""
    command_line = REPO / "kdoiqa" / "cli.py"
    files = [REPO / name for name in tracked() if name.endswith(".py") and (REPO / name).is_file()]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                assert not ast.unparse(target).endswith("ArgumentParser.error"), f"{path}: patches argparse"
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args:
                assert not ast.unparse(node.args[0]).endswith("ArgumentParser"), f"{path}: patches argparse"
        if path.relative_to(REPO).parts[0] != "kdoiqa" or path == command_line:
            continue
        found = _imports(path)
        for node in ast.walk(tree):  # relative imports: `from . import cli`, `from .cli import ...`
            if isinstance(node, ast.ImportFrom) and node.level:
                found |= {f"kdoiqa.{node.module or alias.name}" for alias in node.names}
        assert not found & {"argparse", "kdoiqa.cli"}, f"{path} imports {found & {'argparse', 'kdoiqa.cli'}}"


def test_parser_errors_are_one_line_and_argparse_is_left_alone(capsys):
    import argparse

    from kdoiqa import cli, common

    seen = {}

    def main() -> None:
        seen["error"] = argparse.ArgumentParser.error
        parser = cli.Parser(prog="x.py")
        parser.add_argument("--size", type=cli.size_type("--size"))
        parser.parse_args(["--size", "0x3"])

    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(main)
    assert exit_info.value.code == 2 and seen["error"] is argparse.ArgumentParser.error
    assert capsys.readouterr().err == "error: x.py: argument --size: --size must be positive, got '0x3' (see x.py --help)\n"
    with pytest.raises(SystemExit):
        common.run_cli(lambda: cli.Parser(prog="x.py").parse_args(["--bogus"]))
    assert capsys.readouterr().err == "error: x.py: unrecognized arguments: --bogus (see x.py --help)\n"
    with pytest.raises(ValueError, match="must look like 1024x512"):  # the library's own parser: a ValueError
        common.parse_size("wide")
    assert common.parse_size("64x32") == (64, 32) and common.parse_size("7") == (7, 7)


def test_pip_install_e_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    # The runtime dependencies come from this environment (a .pth file: no 5 GB torch install); pip builds the
    # editable install as a user's pip does (its build backend, setuptools, from the package index).
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    egg_info = REPO / "kdoiqa.egg-info"  # what setuptools writes beside the sources; removed after
    had_egg_info = egg_info.exists()
    try:
        proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", "-e", str(REPO)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    finally:
        if not had_egg_info:
            shutil.rmtree(egg_info, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("models", "viewport"):  # a user's own packages of these names are never imported
        (elsewhere / name).mkdir()
        (elsewhere / name / "__init__.py").write_text("raise ImportError('the user\'s own package was imported')\n")
    check = subprocess.run([str(python), "-c", "import json, kdoiqa, kdoiqa.models, kdoiqa.viewport.project; "
                            "print(json.dumps([kdoiqa.__file__, callable(kdoiqa.load), kdoiqa.Scorer.__name__]))"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-2000:]
    path, loadable, name = json.loads(check.stdout)
    assert Path(path).resolve() == (REPO / "kdoiqa" / "__init__.py").resolve() and loadable and name == "Scorer"


def test_the_wheel_installs_kdoiqa_alone_and_its_console_script_scores_beside_a_users_models(trained, tmp_path):
    import zipfile

    src = tmp_path / "src"  # the checkout's files, built outside it (setuptools writes build/ beside the sources)
    for name in tracked():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300,
                           env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"kdoiqa-{kdoiqa.__version__}.dist-info"
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {"kdoiqa", dist_info}
    assert {"kdoiqa/models/teacher.py", "kdoiqa/viewport/equi2cubic.py", "kdoiqa/predicting.py"} <= set(names)
    assert "kdoiqa-predict = kdoiqa.cli:predict_command" in entry_points
    # A fresh venv (no pip of its own; the dependencies from this environment by a .pth file), the wheel alone.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300, env=env)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # A user's project with its own models/ and viewport/ packages (importing either is an error), on PYTHONPATH.
    user = tmp_path / "project"
    for name in ("models", "viewport"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    (user / "photos").mkdir()
    for image in trained["images"][:3]:
        shutil.copy2(image, user / "photos" / image.name)
    photos = sorted((user / "photos").iterdir())
    expected = predict_csv(trained["student"], photos, tmp_path / "checkout.csv")  # the checkout's predict.py
    user_env = {**env, "PYTHONPATH": str(user)}
    script = venv / "bin" / "kdoiqa-predict"
    shown = subprocess.run([str(script), "--help"], cwd=user, capture_output=True, text=True, timeout=120, env=user_env)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: kdoiqa-predict"), shown.stderr[-2000:]
    scored = subprocess.run([str(script), str(trained["student"]), "photos", "--csv", "scores.csv", "--device", "cpu",
                             "--no-progress"], cwd=user, capture_output=True, text=True, timeout=300, env=user_env)
    assert scored.returncode == 0, scored.stderr[-2000:]
    table = pd.read_csv(user / "scores.csv")
    assert [Path(name).name for name in table["image"]] == [p.name for p in photos]
    np.testing.assert_allclose(table["score"].to_numpy(), expected["score"].to_numpy(), atol=1e-4)
    wrong = subprocess.run([str(script), str(tmp_path / "missing"), "photos"], cwd=user, capture_output=True, text=True,
                           timeout=120, env=user_env)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: ") and wrong.stderr.count("\n") == 1, wrong.stderr
    # From Python in that folder: the installed package, the user's packages untouched.
    code = ("import json, sys, kdoiqa; metric = kdoiqa.load(sys.argv[1], 'cpu'); scores = metric(sys.argv[2:]); "
            "print(json.dumps([kdoiqa.__file__, scores.tolist(), sorted({'models', 'viewport'} & set(sys.modules))]))")
    used = subprocess.run([str(python), "-c", code, str(trained["student"]), *map(str, photos)], cwd=user,
                          capture_output=True, text=True, timeout=300, env=user_env)
    assert used.returncode == 0, used.stderr[-2000:]
    path, scores, claimed = json.loads(used.stdout)
    assert Path(path).is_relative_to(venv) and claimed == []
    np.testing.assert_allclose(scores, expected["score"].to_numpy(), atol=1e-4)


def test_predict_and_make_synthetic_db_are_thin_scripts():
    """Their work is the library's (kdoiqa.predicting, kdoiqa.synthetic, the command line in kdoiqa.cli)."""
    for script, allowed in (("predict.py", set()), ("make_synthetic_db.py", {"build_parser", "main"})):
        tree = ast.parse((REPO / script).read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert defined <= allowed and len((REPO / script).read_text().splitlines()) < 120, (script, defined)
    import make_synthetic_db
    from kdoiqa import synthetic

    assert make_synthetic_db.make_content is synthetic.make_content and predict.main.__module__ == "kdoiqa.cli"
