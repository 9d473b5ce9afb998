"""The environment files agree with each other and the project layout is complete."""
import os
import re
import tomllib

from conftest import ROOT


def _pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(r.split("==") for r in reqs)


def _environment_pins():
    text = (ROOT / "environment.yml").read_text()
    return dict(re.findall(r"^\s+-\s+([A-Za-z0-9_.-]+)==([^\s#]+)\s*$", text, flags=re.M))


def test_environment_yml_and_pyproject_pin_the_same_packages_and_versions():
    pyproject, env = _pyproject_pins(), _environment_pins()
    assert pyproject, "pyproject.toml pins nothing"
    assert env == pyproject, f"differ: {set(env.items()) ^ set(pyproject.items())}"


def test_every_dependency_is_pinned_and_python_is_3_11():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert "==" in req, f"{req} is not pinned"
    assert re.search(r"^\s+-\s+python=3\.11\s*$", (ROOT / "environment.yml").read_text(), flags=re.M)
    assert {"torch", "torchvision", "pytorch-lightning", "jupyterlab", "jupytext", "nbval"} <= set(_pyproject_pins())


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    head = readme[:1500]
    assert "make setup && make lab" in head and "make setup && make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make setup && make test" in ci


def test_jupytext_pairs_ipynb_with_py_percent():
    config = tomllib.loads((ROOT / "jupytext.toml").read_text())
    assert config["formats"] == "ipynb,py:percent"


def test_make_clean_never_deletes_training_runs():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^clean:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    assert "rm" in recipe and "runs" not in recipe, f"`make clean` must keep runs/: {recipe.strip()}"


def test_make_test_names_every_test_file_and_chapter_once_longest_first():
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make too
    printed = subprocess.run(["make", "-n", "--no-print-directory", "test"], cwd=ROOT, capture_output=True, text=True,
                             check=True, env=env).stdout
    line = next(line for line in printed.splitlines() if " -m pytest " in line)
    assert "--no-loadscope-reorder" in line, "without it pytest-xdist hands out the one-test files last"
    named = [w for w in line.split() if w.endswith((".py", ".ipynb"))]
    expected = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("tests/test_*.py"),
                                                           *ROOT.glob("notebooks/[0-9][0-9]_*.ipynb")])
    assert sorted(named) == expected, "each test file and chapter once, none missing, no folder"
    assert named[0].startswith("tests/test_student_edition_"), "the longest files first"
