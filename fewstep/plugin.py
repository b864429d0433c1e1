"""Plugin discovery and the per-run plugin manager (DESIGN.md §4).

Discovery finds every installed plugin of the entry-point group ``fewstep.plugins`` (the built-in methods
are registered there too) so that ``fewstep plugins`` can list them and a recipe's ``method.name`` can be
validated. A run then activates only the core's default plugins, the one plugin that provides the recipe's
method, and any extra plugins the recipe names, so two method plugins never both answer ``fewstep_loss``.

Import-light discovery (docs/PLUGINS.md "Config modules"): a plugin whose entry point names module ``pkg.mod``
may ship ``pkg.mod_config``, holding its method configs and its pure-config hooks (``fewstep_method_config``,
``fewstep_configure``) with no heavier imports than pydantic. Discovery then imports only that module, so
``fewstep plugins`` and ``fewstep validate`` never import torch or diffusers; :func:`build_manager` imports
the plugin module itself when a run needs it. A plugin without a config module is imported whole, as before.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pluggy

from fewstep import hookspecs

ENTRY_POINT_GROUP = "fewstep.plugins"
#: A plugin module ``pkg.mod`` declares its configs import-light in ``pkg.mod`` + CONFIG_SUFFIX.
CONFIG_SUFFIX = "_config"

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
    """What discovery learnt about one installed plugin. ``module`` is None until :meth:`load` imports it
    (discovery imports only ``config_module`` when the plugin has one)."""

    name: str
    module: Any | None  # the plugin object given to pluggy: the entry point's module
    source: str  # "distribution version" that declared the entry point
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> pydantic model
    error: str | None = None
    entry_point: importlib.metadata.EntryPoint | None = None
    config_module: ModuleType | None = None  # the import-light module of configs, if the plugin has one

    def load(self) -> Any:
        """The plugin module, imported on first use; a failed import is recorded in ``error`` and raised."""
        if self.module is None and self.error is None:
            if self.entry_point is None:
                raise PluginError(f"plugin {self.name!r} has no module to import")
            try:
                self.module = self.entry_point.load()
            except Exception as exc:  # noqa: BLE001 - report any import failure by plugin name
                self.error = f"import of {self.entry_point.value!r} failed: {exc!r}"
        if self.error:
            raise PluginError(f"plugin {self.name!r} cannot be used: {self.error}")
        return self.module

    def implements(self, hook: str) -> bool:
        """Whether the plugin implements ``hook``, read from its source when it is not imported yet."""
        names = self.hook_names()
        if names is None:
            self.load()
            names = self.hook_names()
        return hook in (names or ())

    def hook_names(self) -> set[str] | None:
        """Names of the hooks the plugin implements, without importing it when it is not loaded yet (read from
        its module's source: top-level functions decorated with ``hookimpl``, plus its config module's); None
        when only importing tells (no source file, or an entry point naming an object in the module)."""
        config = _hooks_of(self.config_module) if self.config_module is not None else set()
        if self.module is not None:
            return _hooks_of(self.module) | config
        ep = self.entry_point
        if ep is None or ep.attr:
            return None
        try:
            spec = importlib.util.find_spec(ep.module)
            if spec is None or not (spec.origin or "").endswith(".py"):
                return None
            return _decorated_hooks(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) | config
        except (ImportError, OSError, ValueError, SyntaxError):
            return None


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _hooks_of(plugin: Any) -> set[str]:
    """Hook names ``plugin`` implements (a hookimpl's ``specname`` when it sets one)."""
    pm = new_manager()
    names = set()
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is not None:
            names.add(opts.get("specname") or attr)
    return names


def _decorated_hooks(tree: ast.Module) -> set[str]:
    """Top-level functions of a parsed module decorated with ``@hookimpl`` / ``@hookimpl(...)`` (any name ending
    in ``hookimpl``), by their ``specname`` when the decorator sets one."""
    names = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            target = call.func if call is not None else deco
            tail = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if not tail.endswith("hookimpl"):
                continue
            spec = next((k.value.value for k in (call.keywords if call else []) if k.arg == "specname"
                         and isinstance(k.value, ast.Constant)), None)
            names.add(spec or node.name)
    return names


def _method_configs(name: str, module: Any) -> dict[str, Any]:
    """Register ``module`` alone to validate its hook names and collect its method models."""
    pm = new_manager()
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} ({getattr(module, '__name__', module)}) is malformed: {exc}") from None
    methods: dict[str, Any] = {}
    for result in pm.hook.fewstep_method_config():
        for method_name, model in result if isinstance(result, list) else [result]:
            if method_name in methods:
                raise PluginError(f"plugin {name!r} declares method {method_name!r} twice")
            methods[method_name] = model
    return methods


def _config_module(ep: importlib.metadata.EntryPoint) -> ModuleType | None:
    """The entry point module's import-light config module (``pkg.mod_config``), imported; None if absent."""
    try:
        spec = importlib.util.find_spec(ep.module + CONFIG_SUFFIX)
    except ModuleNotFoundError:  # the parent package itself is missing: importing the plugin reports it
        return None
    return None if spec is None else importlib.import_module(ep.module + CONFIG_SUFFIX)


def discover(*, full: bool = False) -> dict[str, PluginInfo]:
    """Find every entry point of ``fewstep.plugins``: import its config module where it has one (its plugin
    module then stays unimported until :meth:`PluginInfo.load`), the whole plugin module otherwise, or every
    plugin module with ``full`` (also checking its hook names). A plugin that fails to import is reported
    with its import error instead of breaking discovery of the others."""
    found: dict[str, PluginInfo] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        if ep.name in found:
            found[ep.name].error = f"entry point name {ep.name!r} is declared twice (also by {source})"
            continue
        info = found[ep.name] = PluginInfo(ep.name, None, source, entry_point=ep)
        try:
            info.config_module = _config_module(ep)
        except Exception as exc:  # noqa: BLE001 - report any import failure by plugin name
            info.error = f"import of {ep.module + CONFIG_SUFFIX!r} failed: {exc!r}"
            continue
        if info.config_module is None or full:
            try:
                info.load()
            except PluginError:
                continue
        elif importlib.util.find_spec(ep.module) is None:
            info.error = f"import of {ep.value!r} failed: no module named {ep.module!r}"
            continue
        try:
            info.methods = _method_configs(ep.name, info.config_module or info.module)
            if full and info.config_module is not None:
                _method_configs(ep.name, info.module)  # its own hook names too
        except PluginError as exc:
            info.error = str(exc)
    return found


def _register(pm: pluggy.PluginManager, info: PluginInfo) -> None:
    """Register the plugin module under its name, and the hooks of its config module that it does not import
    (a plugin module may re-export its config hooks or leave them to its config module) as NAME_config."""
    module = info.load()
    pm.register(module, name=info.name)
    config = info.config_module
    if config is None:
        return
    missing = {attr: getattr(config, attr) for attr in dir(config) if pm.parse_hookimpl_opts(config, attr) is not None
               and getattr(module, attr, None) is not getattr(config, attr)}
    if missing:
        pm.register(SimpleNamespace(**missing), name=info.name + CONFIG_SUFFIX)


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


def run_plugins(method: str, *, extra: list[str] = (), disabled: list[str] = (),
                plugins: dict[str, PluginInfo] | None = None) -> list[PluginInfo]:
    """The installed plugins a run activates besides the core's: the one providing ``method``, then ``extra``.
    Checks ``disabled`` and ``extra`` against the installed names."""
    disabled_set = set(disabled)
    if bad := disabled_set & REQUIRED_BUILTINS:
        raise PluginError(f"plugins.disable: {sorted(bad)} cannot be disabled (the core defaults live there)")
    plugins = discover() if plugins is None else plugins
    unknown = disabled_set - set(BUILTIN_PLUGINS) - set(plugins)
    if unknown:
        known = sorted(set(BUILTIN_PLUGINS) | set(plugins))
        raise PluginError(f"plugins.disable: unknown plugin(s) {sorted(unknown)}; known plugins: {known}")
    registry = method_registry(plugins, disabled_set)
    if method not in registry:
        raise PluginError(_unknown_method_message(method, registry, plugins))
    chosen: list[PluginInfo] = []
    for name in dict.fromkeys([registry[method][0], *extra]):
        info = plugins.get(name)
        if info is None:
            raise PluginError(f"plugins.extra: no installed plugin named {name!r}; installed: {sorted(plugins)}")
        if info.error:
            raise PluginError(f"plugin {name!r} cannot be used: {info.error}")
        chosen.append(info)
    return chosen


def build_manager(method: str, *, extra: list[str] = (), disabled: list[str] = (),
                  plugins: dict[str, PluginInfo] | None = None) -> pluggy.PluginManager:
    """The plugin manager of one run: core defaults (minus ``disabled``), the plugin providing
    ``method``, and the ``extra`` plugins, each with the hooks of its config module. Misspelled hook
    implementations fail here."""
    chosen = run_plugins(method, extra=extra, disabled=disabled, plugins=plugins)
    pm = new_manager()
    for name, module_path in BUILTIN_PLUGINS.items():
        if name in set(disabled):
            pm.set_blocked(name)
            continue
        module = importlib.import_module(module_path)
        # A built-in with per-run state exposes plugin(): a fresh object for every run.
        pm.register(module.plugin() if hasattr(module, "plugin") else module, name=name)
    for info in chosen:
        _register(pm, info)
    _check_pending(pm)
    return pm


def config_manager(chosen: list[PluginInfo]) -> pluggy.PluginManager:
    """The pure-config hooks (``fewstep_configure``) of the ``chosen`` plugins (:func:`run_plugins`), for
    ``fewstep validate``: each one's config module, or its whole module when it has none. No core plugin is
    registered: none implements a config hook (tests/test_plugin.py checks it)."""
    pm = new_manager()
    for info in chosen:
        pm.register(info.config_module if info.config_module is not None else info.load(), name=info.name)
    _check_pending(pm)
    return pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist (misspelled?): {exc}") from None


def _unknown_method_message(method: str, registry: dict[str, tuple[str, Any]], plugins: dict[str, PluginInfo]) -> str:
    import difflib

    msg = f"method.name: unknown method {method!r}; available: {', '.join(sorted(registry)) or '(none)'}"
    if close := difflib.get_close_matches(method, list(registry), n=1):
        msg += f" (did you mean {close[0]!r}?)"
    broken = [f"{i.name}: {i.error}" for i in plugins.values() if i.error]
    if broken:
        msg += "; plugins that failed to load: " + "; ".join(broken)
    return msg
