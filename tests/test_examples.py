"""The example plugin package in examples/custom_plugin works like an installed third-party plugin."""

import importlib.util
import sys
from pathlib import Path

import pytest

from fewstep.plugin import _method_configs, build_manager, discover
from fewstep.testing import MethodConformance

ROOT = Path(__file__).parents[1] / "examples" / "custom_plugin"


def _load_example():
    spec = importlib.util.spec_from_file_location("fewstep_kd", ROOT / "fewstep_kd" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fewstep_kd"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def example_plugin(monkeypatch):
    """Stand in for `pip install examples/custom_plugin`: add the entry point it declares."""
    import importlib.metadata as md

    module = _load_example()
    real = md.entry_points

    def entry_points(group=None, **kw):
        eps = list(real(group=group, **kw))
        if group == "fewstep.plugins":
            eps.append(md.EntryPoint("kd_online", "fewstep_kd", group))
        return md.EntryPoints(eps)

    monkeypatch.setattr(md, "entry_points", entry_points)
    return module


def test_example_is_discovered_and_valid(example_plugin):
    assert set(_method_configs("kd_online", example_plugin)) == {"kd_online"}
    info = discover()["kd_online"]
    assert info.error is None and set(info.methods) == {"kd_online"}
    pm = build_manager("kd_online")
    assert pm.get_plugin("kd_online") is example_plugin and pm.get_plugin("cm") is None


class TestKDConformance(MethodConformance):
    method = {"name": "kd_online", "teacher_steps": 2}
    backbones = ("unet", "dit")
