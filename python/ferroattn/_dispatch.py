"""Where a call goes: the NumPy path (the Rust kernels) or :mod:`ferroattn.torch`.

The one place that tells torch tensors from NumPy arrays, resolves ``backend=`` and imports
:mod:`ferroattn.torch` (lazily, so ``import ferroattn`` never imports torch). Tensors are
recognized through ``sys.modules``: without torch imported no tensor can exist, so a NumPy
program never pays for the question.

The public functions and classes ask here first and fall through to their NumPy code when the
answer is "NumPy"; the torch module below knows nothing of them and gets the NumPy function to
run, where it needs one, as an argument.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .variants import T5Bias

__all__ = [
    "cache_storage",
    "from_numpy",
    "on_tensor_views",
    "route",
    "tensor_among",
    "to_numpy",
    "wants_torch",
]


def _tensor_type() -> type | None:
    """``torch.Tensor`` when torch is imported, else None (no tensor can exist then)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def tensor_among(*xs: Any) -> bool:
    """Whether a torch tensor is among ``xs`` (never imports torch)."""
    tensor = _tensor_type()
    return tensor is not None and any(isinstance(x, tensor) for x in xs)


def wants_torch(backend: Any, *xs: Any) -> bool:
    """Whether an attention call belongs to :mod:`ferroattn.torch`: ``backend="torch"``, or a
    tensor among ``xs`` (a :class:`ferroattn.T5Bias` counts by its table)."""
    if backend == "auto" or backend == "cpu":
        tensor = _tensor_type()
        return tensor is not None and any(
            isinstance(x, tensor) or (isinstance(x, T5Bias) and isinstance(x.table, tensor))
            for x in xs
        )
    if backend == "torch":
        return True
    raise ValueError(f"backend must be 'auto', 'cpu' or 'torch', got {backend!r}")


def _torch_module() -> ModuleType:
    from . import torch as torch_module  # imports torch: only reached when torch is in play

    return torch_module


def _data_kind(data: dict[str, Any]) -> tuple[bool, Any]:
    """Whether ``q``, ``k`` (, ``v``, ``out``) are tensors (else NumPy), and their device."""
    tensor = _tensor_type()
    tensors = {n for n, x in data.items() if tensor is not None and isinstance(x, tensor)}
    present = {n for n, x in data.items() if x is not None}
    if tensors and tensors != present:
        others = ", ".join(sorted(present - tensors))
        raise TypeError(
            f"{', '.join(sorted(tensors))} are torch tensors but {others} are not: pass "
            "q, k, v (and out) all as torch tensors or all as NumPy arrays"
        )
    if not tensors:
        return False, None
    devices = {n: data[n].device for n in tensors}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"q, k, v and out must be on one device, got {listed}")
    return True, first


def _resolve(backend: str, device: Any) -> str:
    """``"cpu"`` (the Rust kernels) or ``"torch"``; ``"auto"`` follows the tensors' device."""
    if backend == "auto":
        return "cpu" if device is None or device.type == "cpu" else "torch"
    return backend


def route(
    name: str,
    numpy_func: Callable[..., Any],
    data: dict[str, Any],
    aux: dict[str, Any],
    backend: str,
) -> Any:
    """Send an attention call of :mod:`ferroattn.functional` where :func:`wants_torch` said
    it belongs: the Rust kernels on NumPy views of the tensors, or torch.

    ``name`` is the function (``"attention"``, ``"attention_varlen"``,
    ``"attention_weights"``), ``numpy_func`` its NumPy implementation; ``data`` holds ``q``,
    ``k`` (, ``v``, ``out``), ``aux`` every other argument.
    """
    tensors, device = _data_kind(data)
    torch_module = _torch_module()
    inputs = [x for n, x in data.items() if n != "out"]
    if _resolve(backend, device) == "cpu":
        out = data.get("out")
        if not tensors:  # NumPy data with a tensor among the options
            aux = {n: torch_module.as_numpy(x) for n, x in aux.items()}
            return numpy_func(*inputs, **aux, **({} if out is None else {"out": out}))
        # The tensors share `device` (checked above): no second check.
        kwargs = {"out": out, "backend": "cpu", **aux}
        return torch_module.on_views(numpy_func, inputs, kwargs, device)
    return torch_module.compute(name, data, aux, tensors)


def on_tensor_views(method: Callable[..., Any], *arrays: Any, **kwargs: Any) -> Any:
    """Run a NumPy method on NumPy views of tensors and hand tensors back (see
    :func:`ferroattn.torch.numpy_call`, which takes the same arguments)."""
    return _torch_module().numpy_call(method, *arrays, **kwargs)


def to_numpy(t: Any) -> Any:
    """A tensor as a NumPy array (a view of CPU memory; see :func:`ferroattn.torch.to_numpy`)."""
    return _torch_module().to_numpy(t)


def from_numpy(a: Any) -> Any:
    """A CPU tensor sharing a NumPy array's memory (see :func:`ferroattn.torch.from_numpy`)."""
    return _torch_module().from_numpy(a)


def cache_storage(device: Any, backend: Any = "auto") -> Any | None:
    """The storage of a :class:`ferroattn.KVCache` on ``device`` for ``backend``: None for NumPy
    arrays read by the Rust kernels (``"cpu"``, and ``"auto"`` on the CPU), else torch tensors
    on that device computed by torch (``"torch"``, and ``"auto"`` on another device)."""
    on_cpu = device is None or str(device) == "cpu"
    if backend == "auto":
        backend = "cpu" if on_cpu else "torch"
    if backend == "cpu":
        if not on_cpu:
            raise ValueError(
                f"backend='cpu' keeps the cache in CPU memory, but device={device!r}; "
                "use backend='auto' or 'torch' for a cache on that device"
            )
        return None
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'cpu' or 'torch', got {backend!r}")
    return _torch_module().TorchStorage(device)
