"""Plugin discovery and the per-run plugin manager (DESIGN.md §4).

Discovery loads every installed plugin of the entry-point group ``fewstep.plugins`` (the built-in
methods are registered there too) so that ``fewstep plugins`` can list them and a recipe's
``method.name`` can be validated. A run then activates only the core's default plugins, the one
plugin that provides the recipe's method, and any extra plugins the recipe names, so two method
plugins never both answer ``fewstep_loss``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from fewstep import hookspecs

ENTRY_POINT_GROUP = "fewstep.plugins"

# Core default plugins, in registration order. "core" holds the trylast defaults and cannot be disabled.
BUILTIN_PLUGINS: dict[str, str] = {
    "core": "fewstep.builtin.core",
    "ema": "fewstep.builtin.ema",
    "checkpoint": "fewstep.builtin.checkpoint",
    "logging": "fewstep.builtin.logging",
    "validation": "fewstep.builtin.validation",
    "export": "fewstep.builtin.export",
    "lora": "fewstep.builtin.lora",
    "tracking": "fewstep.builtin.tracking",
}
REQUIRED_BUILTINS = frozenset({"core"})


class PluginError(RuntimeError):
    """A plugin could not be loaded, is malformed, or a recipe asks for one that does not exist."""


@dataclass
class PluginInfo:
    """What discovery learnt about one installed plugin."""

    name: str
    module: ModuleType | None
    source: str  # "distribution version" that declared the entry point
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> pydantic model
    error: str | None = None


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _method_configs(name: str, module: ModuleType) -> dict[str, Any]:
    """Register ``module`` alone to validate its hook names and collect its method models."""
    pm = new_manager()
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} ({module.__name__}) is malformed: {exc}") from None
    methods: dict[str, Any] = {}
    for result in pm.hook.fewstep_method_config():
        for method_name, model in result if isinstance(result, list) else [result]:
            if method_name in methods:
                raise PluginError(f"plugin {name!r} declares method {method_name!r} twice")
            methods[method_name] = model
    return methods


def discover() -> dict[str, PluginInfo]:
    """Load every entry point of ``fewstep.plugins``. A plugin that fails to import is reported with
    its import error instead of breaking discovery of the others."""
    found: dict[str, PluginInfo] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        if ep.name in found:
            found[ep.name].error = f"entry point name {ep.name!r} is declared twice (also by {source})"
            continue
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - report any import failure by plugin name
            found[ep.name] = PluginInfo(ep.name, None, source, error=f"import of {ep.value!r} failed: {exc!r}")
            continue
        info = PluginInfo(ep.name, module, source)
        try:
            info.methods = _method_configs(ep.name, module)
        except PluginError as exc:
            info.error = str(exc)
        found[ep.name] = info
    return found


def method_registry(plugins: dict[str, PluginInfo], disabled: set[str] = frozenset()) -> dict[str, tuple[str, Any]]:
    """Map method name -> (plugin name, config model) over healthy, enabled plugins."""
    registry: dict[str, tuple[str, Any]] = {}
    for info in plugins.values():
        if info.error or info.name in disabled:
            continue
        for method, model in info.methods.items():
            if method in registry:
                other = registry[method][0]
                raise PluginError(
                    f"method {method!r} is provided by both plugins {other!r} and {info.name!r}; "
                    f"disable one with plugins.disable: [{info.name}] in the recipe"
                )
            registry[method] = (info.name, model)
    return registry


def build_manager(method: str, *, extra: list[str] = (), disabled: list[str] = (),
                  plugins: dict[str, PluginInfo] | None = None) -> pluggy.PluginManager:
    """The plugin manager of one run: core defaults (minus ``disabled``), the plugin providing
    ``method``, and the ``extra`` plugins. Misspelled hook implementations fail here."""
    disabled_set = set(disabled)
    if bad := disabled_set & REQUIRED_BUILTINS:
        raise PluginError(f"plugins.disable: {sorted(bad)} cannot be disabled (the core defaults live there)")
    plugins = discover() if plugins is None else plugins
    unknown = disabled_set - set(BUILTIN_PLUGINS) - set(plugins)
    if unknown:
        known = sorted(set(BUILTIN_PLUGINS) | set(plugins))
        raise PluginError(f"plugins.disable: unknown plugin(s) {sorted(unknown)}; known plugins: {known}")
    pm = new_manager()
    for name, module_path in BUILTIN_PLUGINS.items():
        if name in disabled_set:
            pm.set_blocked(name)
            continue
        module = importlib.import_module(module_path)
        # A built-in with per-run state exposes plugin(): a fresh object for every run.
        pm.register(module.plugin() if hasattr(module, "plugin") else module, name=name)
    registry = method_registry(plugins, disabled_set)
    if method not in registry:
        raise PluginError(_unknown_method_message(method, registry, plugins))
    for name in [registry[method][0], *extra]:
        info = plugins.get(name)
        if info is None:
            raise PluginError(f"plugins.extra: no installed plugin named {name!r}; installed: {sorted(plugins)}")
        if info.error:
            raise PluginError(f"plugin {name!r} cannot be used: {info.error}")
        if pm.get_plugin(name) is None:
            pm.register(info.module, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist (misspelled?): {exc}") from None
    return pm


def _unknown_method_message(method: str, registry: dict[str, tuple[str, Any]], plugins: dict[str, PluginInfo]) -> str:
    import difflib

    msg = f"method.name: unknown method {method!r}; available: {', '.join(sorted(registry)) or '(none)'}"
    if close := difflib.get_close_matches(method, list(registry), n=1):
        msg += f" (did you mean {close[0]!r}?)"
    broken = [f"{i.name}: {i.error}" for i in plugins.values() if i.error]
    if broken:
        msg += "; plugins that failed to load: " + "; ".join(broken)
    return msg
