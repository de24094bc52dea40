"""Provider plugins: built-ins registered here, third parties through entry points.

A third-party package declares, in its pyproject.toml::

    [project.entry-points."gyroscope.providers"]
    myprovider = "mypackage.provider:factory"     # factory(config) -> Provider
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points
from typing import Callable

from ..errors import ConfigError
from .base import Completion, Delta, Provider, Stream, Timeouts, Usage

ENTRY_POINT_GROUP = "gyroscope.providers"
Factory = Callable[..., Provider]


def _openai(config) -> Provider:
    from .openai_provider import OpenAIProvider
    return OpenAIProvider(config.api_key, config.base_url)


def _simulator(config) -> Provider:
    from .simulator_provider import SimulatorProvider
    return SimulatorProvider()


DEFAULT_PROVIDERS: dict[str, Factory] = {"openai": _openai, "simulator": _simulator}

_lock = threading.Lock()
_registry: dict[str, Factory] | None = None


def _load() -> dict[str, Factory]:
    global _registry
    with _lock:
        if _registry is None:
            registry = dict(DEFAULT_PROVIDERS)
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                registry.setdefault(ep.name, _lazy(ep))
            _registry = registry
        return _registry


def _lazy(ep) -> Factory:
    def factory(config) -> Provider:
        return ep.load()(config)
    factory.__name__ = f"entry_point:{ep.value}"
    return factory


def register(name: str, factory: Factory) -> None:
    """Register a provider factory under ``name`` (replacing any earlier one)."""
    _load()[name] = factory


def names() -> list[str]:
    """Names of every registered provider."""
    return sorted(_load())


def reload() -> None:
    """Forget the registry so entry points are read again (after installing a plugin)."""
    global _registry
    with _lock:
        _registry = None
    importlib.invalidate_caches()


def create(name: str, config) -> Provider:
    """A provider instance by name."""
    factory = _load().get(name)
    if factory is None:
        raise ConfigError(f"Unknown provider {name!r}. Installed providers: {', '.join(names())}.")
    return factory(config)


__all__ = ["Completion", "Delta", "Provider", "Stream", "Timeouts", "Usage", "create", "names",
           "register", "reload", "ENTRY_POINT_GROUP"]
