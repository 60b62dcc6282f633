"""The package as pip builds it: a wheel must carry every module, not only those an editable install finds."""

import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_every_module_of_the_package(tmp_path):
    source = tmp_path / "source"  # a copy, so that no build/ folder of an earlier build can fill the gaps
    shutil.copytree(os.path.join(REPO, "immiscible_pipeline"), source / "immiscible_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    # built with the installed setuptools (requirements-test.txt), reaching no package index
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "-q", str(source), "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/")
               for folder, _, names in os.walk(os.path.join(REPO, "immiscible_pipeline"))
               for name in names if name.endswith(".py")}
    assert any("/noise/" in path for path in on_disk)  # the sub-packages exist, so the check below means something
    assert on_disk - packed == set()
