"""The supported dependency ranges: one import-time warning outside them, and pyproject.toml agrees."""

from __future__ import annotations

import pathlib
import warnings

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from raytrainer import _versions

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
IN_RANGE = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "accelerate": "1.15.0", "ray": "2.60.0"}


@pytest.fixture
def installed(monkeypatch):
    """Pretend these versions are installed (None: not installed); re-arm the once-per-process warning."""
    versions = dict(IN_RANGE)
    monkeypatch.setattr(_versions, "_installed_version", lambda name: versions.get(name))
    monkeypatch.setattr(_versions, "_warned", False)
    return versions


def _check():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _versions.check_versions()
    return [w for w in caught if issubclass(w.category, _versions.UnsupportedVersionWarning)]


def test_no_warning_in_range(installed):
    assert _check() == []
    installed.update(transformers="5.99.1", torch="2.14.1+cu128", accelerate="1.3.0", ray="2.99.0")
    _versions._warned = False
    assert _check() == []


def test_missing_package_is_not_reported(installed):
    installed["ray"] = None
    assert _check() == []


def test_one_warning_one_line_per_package(installed):
    installed.update(transformers="4.57.1", accelerate="2.0.0")
    caught = _check()
    assert len(caught) == 1
    lines = str(caught[0].message).splitlines()
    assert lines == [
        "raytrainer is tested with transformers >=5.23,<6; found 4.57.1: pip install 'transformers>=5.23,<6'",
        "raytrainer is tested with accelerate >=1.3,<2; found 2.0.0: pip install 'accelerate>=1.3,<2'",
    ]


def test_warns_once_per_process(installed):
    installed["transformers"] = "6.0.0"
    assert len(_check()) == 1
    assert _check() == []  # already warned


def test_torch_above_cap_warns(installed):
    installed["torch"] = "2.15.0"
    (w,) = _check()
    assert "torch >=2.13,<=2.14.1; found 2.15.0" in str(w.message)


def test_pyproject_ranges_match_supported():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    declared = {}
    for dep in deps:
        req = Requirement(dep)
        declared[req.name] = req.specifier
    for name, bounds in _versions.SUPPORTED.items():
        assert name in declared, f"pyproject.toml does not declare {name}"
        assert declared[name] == SpecifierSet(",".join(bounds)), (
            f"pyproject.toml declares {name}{declared[name]} but raytrainer/_versions.py SUPPORTED has {bounds}"
        )
        # every supported dependency has both a lower and an upper bound
        assert {s.operator[0] for s in declared[name]} == {">", "<"}, (name, declared[name])
