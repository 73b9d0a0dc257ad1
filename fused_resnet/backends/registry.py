"""Which backend the fused operators run: the registry of backends and the user's choice.

    register(backend, auto_priority=None)   make a Backend instance selectable by its name
    set_backend(name) / use_backend(name)   choose one (or "auto") for what follows
    resolve(device)                         the Backend object an operator runs on device
    available_backends()                    names usable on some device of this machine

`auto` takes, among the backends registered with an `auto_priority`, the highest one
that can run on the tensor's device. A backend asked for by name that cannot run there
raises BackendUnavailableError: only `auto` chooses by itself.

The choice: `use_backend` holds for its block in the current thread (or asyncio task)
only, a context variable; outside any `use_backend`, the process default applies, which
`set_backend` sets and which starts as the FUSED_RESNET_BACKEND environment variable
(default auto; an unknown name there is an error that names the variable, raised when a
backend is first needed, so that `--help` and imports still work).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import torch

from .base import Backend

AUTO = "auto"
ENVIRONMENT_VARIABLE = "FUSED_RESNET_BACKEND"

_BACKENDS: dict = {}        # name -> Backend, in registration order
_AUTO_PRIORITY: dict = {}   # name -> priority of the backends `auto` may choose
_default: Optional[str] = None   # the process default; None: not yet read from the environment
_scoped = contextvars.ContextVar("fused_resnet_backend", default=None)   # use_backend's choice


class BackendUnavailableError(RuntimeError):
    """The backend asked for is not built, or cannot run on the tensor's device."""


def register(backend: Backend, auto_priority: Optional[int] = None) -> Backend:
    """Make `backend` selectable as `backend.name`; with `auto_priority`, `auto` may pick
    it (the highest priority that runs on the tensor's device wins)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register expects a fused_resnet Backend, got {type(backend).__name__}")
    name = backend.name
    if not isinstance(name, str) or not name or name == AUTO:
        raise ValueError(f"a backend needs a name other than {AUTO!r}, got {name!r}")
    _BACKENDS[name] = backend
    _AUTO_PRIORITY.pop(name, None)
    if auto_priority is not None:
        _AUTO_PRIORITY[name] = int(auto_priority)
    return backend


def backend_names() -> tuple:
    """Every name set_backend accepts: "auto" and the registered backends."""
    return (AUTO,) + tuple(_BACKENDS)


def _validate(name: str, source: str = "") -> str:
    names = backend_names()
    if not isinstance(name, str) or name.strip().lower() not in names:
        where = f"{source}=" if source else ""
        raise ValueError(f"unknown fused_resnet backend {where}{name!r}; expected one of {names}")
    return name.strip().lower()


def _process_default() -> str:
    global _default
    if _default is None:
        _default = _validate(os.environ.get(ENVIRONMENT_VARIABLE, AUTO) or AUTO,
                             ENVIRONMENT_VARIABLE)
    return _default


def get_backend() -> str:
    """The current choice ("auto" or a backend name): the innermost `use_backend` of this
    thread / task, else the process default."""
    return _scoped.get() or _process_default()


def set_backend(name: str) -> None:
    """Select the process-wide default backend (what applies outside `use_backend`)."""
    global _default
    _default = _validate(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with fused_resnet.use_backend("cpu"): ...` selects a backend for a block, in this
    thread (or asyncio task) only."""
    token = _scoped.set(_validate(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def get(name: str) -> Backend:
    """The registered Backend called `name`."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise KeyError(f"no fused_resnet backend {name!r} is registered") from None


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device`, or None when it can."""
    return get(_validate(name)).unavailable_reason(device)


def _devices() -> list:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def available_backends() -> list:
    """Backends that are built and usable on at least one device of this machine."""
    devices = _devices()
    return [name for name, b in _BACKENDS.items()
            if any(b.unavailable_reason(d) is None for d in devices)]


def resolve(device: torch.device, name: Optional[str] = None) -> Backend:
    """The backend object to run on `device`: the named one, or the current choice."""
    name = _validate(name or get_backend())
    if name == AUTO:
        ranked = sorted(_AUTO_PRIORITY, key=lambda n: -_AUTO_PRIORITY[n])
        for candidate in ranked:
            if _BACKENDS[candidate].unavailable_reason(device) is None:
                return _BACKENDS[candidate]
        raise BackendUnavailableError(f"no fused_resnet backend runs on {device}")
    backend = _BACKENDS[name]
    why = backend.unavailable_reason(device)
    if why is not None:
        raise BackendUnavailableError(f"fused_resnet backend {name!r} is unavailable: {why}")
    return backend
