"""Backends by name: entry points of the group ``rlm_sandbox.backends``, plus explicit registration."""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from ._box import BackendConfig
from ._errors import BackendNotFound, ConfigError
from ._limits import Limits
from ._sandbox import Sandbox

__all__ = ["available_backends", "backend_config", "open_sandbox", "register_backend", "registry"]

ENTRY_POINT_GROUP = "rlm_sandbox.backends"

#: Known backends and the pip requirement that provides each.
KNOWN_BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "local": "rlm-sandbox",
        "docker": "rlm-sandbox[docker]",
        "daytona": "rlm-sandbox[daytona]",
        "e2b": "rlm-sandbox[e2b]",
    }
)

_registry: dict[str, type[BackendConfig]] = {}
_entry_points: dict[str, importlib.metadata.EntryPoint] = {}
_lock = threading.Lock()
_scanned = False

#: Read-only view of the backends registered so far (entry points load on first use).
registry: Mapping[str, type[BackendConfig]] = MappingProxyType(_registry)


def _scan() -> None:
    global _scanned
    with _lock:
        if _scanned:
            return
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _entry_points.setdefault(ep.name, ep)
        _scanned = True


def register_backend(name: str, config_cls: type[BackendConfig], *, replace: bool = False) -> None:
    """Register a backend config class under ``name``.

    Plug-in distributions do this through the entry-point group ``rlm_sandbox.backends``
    (``name = "package.module:ConfigClass"``); call this for a backend defined in your own code.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, BackendConfig)):
        raise ConfigError("a backend must be a BackendConfig subclass")
    with _lock:
        if name in _registry and _registry[name] is not config_cls and not replace:
            raise ConfigError(f"a backend named {name!r} is already registered (pass replace=True)")
        _registry[name] = config_cls


def _installed_names() -> list[str]:
    _scan()
    return sorted(set(_registry) | set(_entry_points))


def backend_config(name: str) -> type[BackendConfig]:
    """The config class of a backend, loading its plug-in if needed."""
    _scan()
    if name in _registry:
        return _registry[name]
    ep = _entry_points.get(name)
    if ep is None:
        installed = ", ".join(_installed_names()) or "none"
        hint = KNOWN_BACKENDS.get(name)
        extra = f' Install it with: pip install "{hint}"' if hint else ""
        raise BackendNotFound(f"no sandbox backend named {name!r} (installed: {installed}).{extra}")
    try:
        cls = ep.load()
    except ImportError as exc:
        hint = KNOWN_BACKENDS.get(name, ep.value.split(":")[0].split(".")[0])
        raise BackendNotFound(
            f"the {name!r} backend is installed but cannot be imported ({exc}). "
            f'Reinstall it with: pip install "{hint}"'
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, BackendConfig)):
        raise BackendNotFound(f"entry point {ep.value!r} is not a BackendConfig subclass")
    with _lock:
        _registry.setdefault(name, cls)
    return _registry[name]


def available_backends() -> dict[str, str | None]:
    """Every installed backend name with ``None`` if usable here, else the reason it is not."""
    out: dict[str, str | None] = {}
    for name in _installed_names():
        try:
            cls = backend_config(name)
            out[name] = cls().check()
        except BackendNotFound as exc:
            out[name] = str(exc)
        except ValidationError as exc:
            out[name] = f"needs configuration: {exc.errors()[0].get('msg', exc)}"
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break the listing
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def make_config(backend: str | BackendConfig, options: Mapping[str, Any]) -> BackendConfig:
    """Build (and validate) a backend config from a name and keyword options."""
    if isinstance(backend, BackendConfig):
        if options:
            raise ConfigError("pass options either in the config object or as keywords, not both")
        return backend
    cls = backend_config(backend)
    try:
        return cls(**options)
    except ValidationError as exc:
        raise ConfigError(f"invalid options for the {backend!r} backend:\n{exc}") from exc


def open_sandbox(
    backend: str | BackendConfig = "local",
    *,
    limits: Limits | None = None,
    functions: Mapping[str, Callable[..., Any]] | None = None,
    **options: Any,
) -> Sandbox:
    """Open a sandbox on a backend, by registered name or config object.

    ``functions`` become plain functions inside the sandbox that call back to the host.
    ``options`` are the backend config's fields (e.g. ``image=`` for Docker).
    """
    config = make_config(backend, options)
    return config.open(limits=limits, functions=functions)
