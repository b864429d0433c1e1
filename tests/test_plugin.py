"""Plugin discovery, check_pending, disabling by name, and reporting of broken plugins."""

import importlib.metadata
import types

import pytest

from fewstep import cli
from fewstep.hookspecs import hookimpl
from fewstep.plugin import PluginError, PluginInfo, build_manager, discover, method_registry


def test_builtin_methods_are_discovered_through_entry_points():
    plugins = discover()
    assert set(plugins["cm"].methods) == {"cd", "ct", "ict"}
    assert set(plugins["diffusion"].methods) == {"diffusion"}
    assert plugins["cm"].load().__name__ == "fewstep_plugins.cm"
    assert plugins["cm"].source.startswith("fewstep ")


def test_every_builtin_method_plugin_declares_its_configs_in_a_config_module():
    """Discovery then imports no plugin module (so `fewstep plugins` and `validate` import no torch); a plugin
    module re-exports its config module's classes and hooks, which a run registers once."""
    for name, info in discover().items():
        if not info.source.startswith("fewstep "):
            continue
        assert info.module is None, f"plugin {name!r} was imported by discovery: give it plugins/{name}_config.py"
        assert info.config_module.__name__ == f"fewstep_plugins.{name}_config"
        module = info.load()
        for method, model in info.methods.items():
            assert getattr(module, model.__name__) is model
            pm = build_manager(method, plugins={name: info})
            assert len(pm.hook.fewstep_method_config()) == 1
            assert pm.get_plugin(name + "_config") is None  # every built-in plugin module re-exports its hooks


def test_hooks_read_from_source_equal_the_imported_modules():
    """What `validate` reads without importing (here: whether a plugin builds its own teacher) is what the
    imported module registers."""
    from fewstep.plugin import _hooks_of

    for name, info in discover().items():
        from_source = info.hook_names()
        assert from_source is not None, name
        assert from_source == _hooks_of(info.load()) | _hooks_of(info.config_module), name
    plugins = discover()
    assert plugins["diffusion"].implements("fewstep_build_teacher") and not plugins["cm"].implements("fewstep_build_teacher")


def test_config_hooks_a_plugin_module_does_not_import_are_registered_beside_it():
    from pydantic import BaseModel

    class Cfg(BaseModel):
        name: str

    calls = []
    config = _fake_plugin(fewstep_method_config=lambda: ("split", Cfg), fewstep_configure=lambda config: calls.append(1))
    module = _fake_plugin(fewstep_loss=lambda: None)
    info = PluginInfo("split", module, "test 0", methods={"split": Cfg}, config_module=config)
    pm = build_manager("split", plugins={**discover(), "split": info})
    assert pm.get_plugin("split") is module and pm.get_plugin("split_config") is not None
    pm.hook.fewstep_configure(config=None)
    assert calls == [1]
    # validate registers the config module alone, and the module itself only for a plugin without one
    from fewstep.plugin import config_manager, run_plugins

    assert config_manager(run_plugins("split", plugins={"split": info})).get_plugin("split") is config
    bare = PluginInfo("bare", module, "test 0", methods={"bare": Cfg})
    assert config_manager(run_plugins("bare", plugins={"bare": bare})).get_plugin("bare") is module


def test_no_core_plugin_implements_a_config_hook():
    """validate registers no core plugin (fewstep.plugin.config_manager), so none may check the config."""
    import importlib

    from fewstep.plugin import BUILTIN_PLUGINS, _hooks_of

    for path in BUILTIN_PLUGINS.values():
        module = importlib.import_module(path)
        hooks = _hooks_of(module.plugin() if hasattr(module, "plugin") else module)
        assert not hooks & {"fewstep_configure", "fewstep_method_config"}, path


def test_install_provides_fewstep_plugins_not_a_bare_plugins_package(tmp_path):
    """Run from a neutral folder so the source tree is not on sys.path: only the install counts."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util as u; print(u.find_spec('plugins') is None, u.find_spec('fewstep_plugins') is not None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_run_activates_only_the_method_plugin():
    pm = build_manager("cd")
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert "cm" in names and "diffusion" not in names
    assert {"core", "ema", "checkpoint", "logging", "validation", "export"} <= names


def test_disable_builtin_by_name():
    pm = build_manager("cd", disabled=["ema"])
    assert pm.get_plugin("ema") is None and pm.is_blocked("ema")
    with pytest.raises(PluginError, match="cannot be disabled"):
        build_manager("cd", disabled=["core"])
    with pytest.raises(PluginError, match="unknown plugin"):
        build_manager("cd", disabled=["emma"])


def test_disabling_a_method_plugin_removes_its_methods():
    with pytest.raises(PluginError, match="unknown method 'cd'"):
        build_manager("cd", disabled=["cm"])


def _fake_plugin(**hooks):
    mod = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod


def test_misspelled_hook_is_rejected_at_startup():
    from pydantic import BaseModel

    class Cfg(BaseModel):
        name: str

    bad = _fake_plugin(fewstep_method_config=lambda: ("bad", Cfg), fewstep_los=lambda: None)
    plugins = {**discover()}
    plugins["bad"] = PluginInfo("bad", bad, "test 0", methods={"bad": Cfg})
    with pytest.raises(PluginError, match="fewstep_los"):
        build_manager("bad", plugins=plugins)
    # discovery validates the same way, so `fewstep plugins` reports it instead of listing it as healthy
    from fewstep.plugin import _method_configs

    with pytest.raises(PluginError, match="malformed"):
        _method_configs("bad", bad)


def test_unknown_method_suggests_a_close_name():
    with pytest.raises(PluginError, match="did you mean 'cd'"):
        build_manager("cdd")


def test_two_plugins_providing_one_method_is_an_error():
    dup = PluginInfo("dup", None, "x 1", methods={"cd": object})
    with pytest.raises(PluginError, match="both plugins"):
        method_registry({**discover(), "dup": dup})


def test_broken_plugin_is_reported_by_name_without_crashing(monkeypatch, capsys):
    real = importlib.metadata.entry_points

    def fake_entry_points(group=None, **kw):
        eps = list(real(group=group, **kw))
        broken = importlib.metadata.EntryPoint("broken", "no_such_module_xyz", group)
        return importlib.metadata.EntryPoints([*eps, broken])

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    plugins = discover()
    assert "no_such_module_xyz" in plugins["broken"].error
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "FAILED" in out and "No module named" in out
    assert "cd, ct, ict" in out


def test_plugins_says_which_plugins_it_did_not_import(capsys):
    assert cli.main(["plugins"]) == 0
    assert "not imported" in capsys.readouterr().out
    assert cli.main(["plugins", "--import"]) == 0
    out = capsys.readouterr().out
    assert "not imported" not in out and "FAILED" not in out and "cd, ct, ict" in out
