"""`pip install -e .` into an existing Detectron2 environment installs what the package imports:
every third-party module imported under cbam_hrnet_d2/ is declared in pyproject.toml (the deploy
runtimes in its [deploy] and [openvino] extras); detectron2 itself is not installable by name and
is documented."""

import ast
import importlib.metadata as metadata
import os
import re
import sys
import unittest

import tomllib

from .common import REPO

PACKAGE = os.path.join(REPO, "cbam_hrnet_d2")
NOT_ON_PYPI = {"detectron2"}  # README "Install": Detectron2 first, from source or a wheel


def imported_modules():
    """Top-level names of every module imported anywhere in the package (lazy imports too)."""
    names = set()
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"cbam_hrnet_d2"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


class TestDeclaredDependencies(unittest.TestCase):
    def test_every_third_party_import_is_declared(self):
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
        declared = {_dist_name(r) for r in project["dependencies"]}
        extras = project["optional-dependencies"]
        deploy = {_dist_name(r) for name in ("deploy", "openvino") for r in extras[name]}
        dists = metadata.packages_distributions()  # module -> the distributions providing it
        missing = []
        for module in sorted(imported_modules() - NOT_ON_PYPI):
            provided = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            if not provided & (declared | deploy):
                missing.append(f"{module} (from {sorted(provided)})")
        self.assertEqual(missing, [], "imported by cbam_hrnet_d2 but not in pyproject.toml")

    def test_the_scan_sees_the_imports_it_must(self):
        found = imported_modules()
        needed = ("torch", "timm", "cv2", "pycocotools", "detectron2", "onnxruntime", "openvino")
        for module in needed:
            self.assertIn(module, found)

    def test_every_declared_dependency_has_a_lower_bound(self):
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        self.assertEqual([d for d in deps if ">=" not in d], [])

    def test_numpy_is_held_below_2_as_detectron2_declares(self):
        # pip would otherwise upgrade numpy past Detectron2's own numpy<2 (for opencv >= 4.12)
        with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        numpy = [d for d in deps if _dist_name(d) == "numpy"]
        self.assertEqual(len(numpy), 1)
        self.assertIn("<2", numpy[0])
        opencv = [d for d in deps if _dist_name(d) == "opencv-python-headless"]
        self.assertIn("<4.12", opencv[0])
