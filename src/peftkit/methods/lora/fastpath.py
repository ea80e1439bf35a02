"""Eager fast paths of :class:`~.layers.Linear`: the no-grad plan and caches, and the fused training node.

:meth:`Linear.forward <.layers.Linear.forward>` reads like the paper, ``base(x) + scaling * B(A(dropout(x)))``;
before it runs the general path it offers the call to :func:`try_forward`, which computes the same result faster
where it can and returns None where it cannot. These paths exist because a LoRA layer runs per layer per step:

* **No-grad plan (decoding).** Without autograd and with one plain adapter (e.g. each step of ``generate``) the
  layer runs a cached plan (:func:`_build_lean_plan`): one base ``F.linear``, then the update by the native kernel
  (``peftkit.ops.native``) or two small torch ops, after checks that touch as few objects as possible. At decode
  shapes the base matmul has just streamed megabytes of weights through the caches, so every object read
  afterwards is a cache miss: reading them from the plan's direct references instead of walking
  ``self -> lora_B -> module -> _parameters`` made unmerged decoding ~2-3% faster, the kernel ~3-4% more.
* **Cached ``scaling * B.T``** (:func:`_lean_entry`): a contiguous ``(r, out)`` copy of ``B``; ``addmm_`` with a
  row-major second operand is several times cheaper at decode shapes than with ``B.t()`` (CPU BLAS), which made
  up most of an unmerged adapter's cost per generated token.
* **Fused training node** (:func:`_fused_forward`): one plain adapter on a frozen, hook-free ``nn.Linear`` base as
  a single autograd node (:func:`~peftkit.ops.lora_fused.linear_lora`).

The layer keeps the state (``_bt_cache``, ``_lean_plan``) and drops it on ``_refresh``, ``train()`` and
``delete_adapter``. Under ``torch.compile`` none of this runs (plans, caches and the kernel are eager
optimisations dynamo cannot trace): the layer checks ``torch.compiler.is_compiling()`` before calling here and
computes the plain formula, which dynamo traces without a graph break. Under ``torch.jit.trace`` (which records
torch ops only) the no-grad paths are skipped too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from ...ops.lora_fused import linear_lora
from ...ops.lowrank import add_lowrank_pretransposed_, scaled_transpose
from ...ops.native import lowrank_kernel

if TYPE_CHECKING:
    from .layers import Linear

#: inputs up to this many elements (a few decoding rows) take the fewest-ops form of the no-grad LoRA update
_FEW_ELEMENTS = 1 << 14
_any_autocast = torch._C._is_any_autocast_enabled  # one C call (``torch.is_autocast_enabled(device)`` costs 5x)
_grad_enabled = torch.is_grad_enabled
_tracing = torch._C._get_tracing_state  # not None inside torch.jit.trace
# torch registers global module hooks into these dicts (never rebinds them): held directly for the no-grad plan
_GLOBAL_FORWARD_HOOKS = torch_module._global_forward_hooks
_GLOBAL_FORWARD_PRE_HOOKS = torch_module._global_forward_pre_hooks


def try_forward(layer: Linear, x: torch.Tensor) -> torch.Tensor | None:
    """``x: (..., in) -> (..., out)`` by a fast path of ``layer`` (called for ``forward(x)`` without extra
    arguments, outside ``torch.compile``), or None when the layer must take its general path.

    With autograd: :func:`_fused_forward`. Without: the cached plan when it still holds (every check reads the
    plan's direct references, see :func:`_build_lean_plan`), else :func:`_inference_forward`, which builds it.
    Disabled adapters, mixed batches, a base that may not be written in place and ``torch.jit.trace`` (without
    autograd) return None. One call on the plan path: it runs per layer per generated token."""
    if _grad_enabled():
        if layer._disable_adapters or layer._row_adapters is not None or not layer._inplace:
            return None
        return _fused_forward(layer, x)
    if _tracing():  # torch.jit.trace records torch ops only: no kernel, no caches (the general path)
        return None
    plan = layer._lean_plan
    if plan is not None:
        (adapters, modules, base, base_params, base_attrs, hooks, pre_hooks, a_owner, a_mods, a_mod, a_params,
         b_owner, b_mods, b_mod, b_params, B, ptr, version, name, scaling, drop, dtype, bts, a_pre, a_post, b_pre,
         b_post, native) = plan
        if (layer._forward_adapters is adapters and not layer._disable_adapters and layer._row_adapters is None
                and modules["base_layer"] is base and modules["lora_A"] is a_owner and a_mods[name] is a_mod
                and modules["lora_B"] is b_owner and b_mods[name] is b_mod and b_params["weight"] is B
                and b_params["bias"] is None and B.data_ptr() == ptr and B._version == version
                and layer.scaling[name] is scaling and (drop is None or not drop.training) and x.dtype is dtype
                and not (hooks or pre_hooks or "forward" in base_attrs or a_pre or a_post or b_pre or b_post
                         or _GLOBAL_FORWARD_HOOKS
                         or _GLOBAL_FORWARD_PRE_HOOKS or _any_autocast())):
            A = a_params["weight"]
            if A.dtype is dtype:
                return _lean_update(F.linear(x, base_params["weight"], base_params["bias"]), x, A, bts, native)
    if layer._disable_adapters or layer._row_adapters is not None or not layer._inplace:
        return None
    return _inference_forward(layer, x)


def _fused_forward(layer: Linear, x: torch.Tensor) -> torch.Tensor | None:
    """Training forward ``x: (..., in) -> (..., out)`` of one plain adapter on a frozen, hook-free ``nn.Linear``
    base as a single autograd node (:func:`linear_lora`: the base's and the adapter's input gradients are written
    into one tensor); None when the general path is needed (several adapters, a variant such as DoRA, a LoRA bias, a tensor
    scaling, a custom dropout module, a trainable or tensor-subclass base weight such as torchao's, mixed dtypes,
    autocast, hooks)."""
    modules = layer._modules
    base = modules["base_layer"]
    names = layer._forward_adapters
    if len(names) != 1 or not _hook_free_linear(base):
        return None
    name = names[0]
    if name in layer._variants:  # a variant (DoRA, ...) computes its own forward: never this plain-LoRA node
        return None
    if calls_modules(layer, modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]):
        return None
    W, b = base._parameters["weight"], base._parameters["bias"]
    A_params, B_params = modules["lora_A"]._modules[name]._parameters, modules["lora_B"]._modules[name]._parameters
    A, B = A_params["weight"], B_params["weight"]
    scaling = layer.scaling[name]
    p = dropout_p(modules["lora_dropout"]._modules[name])
    if (W.requires_grad or type(W) is not nn.Parameter or type(scaling) is not float
            or B_params.get("bias") is not None or p is None or not (x.dtype == W.dtype == A.dtype == B.dtype)):
        return None
    return linear_lora(x, W, b, A, B, scaling, p)


def _inference_forward(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """Lean no-grad forward ``x: (..., in) -> (..., out)`` (e.g. decoding) of a hook-free ``nn.Linear`` base:
    ``F.linear``, then per plain adapter (float scaling, no bias, no active dropout, no DoRA, the base's dtype) the
    update with the cached ``scaling * B.T`` (:func:`_lean_entry`, :func:`_lean_update`); anything else goes
    through the layer's ``_add_adapters``.

    With one adapter this also builds the plan :func:`try_forward` runs on later calls (:func:`_build_lean_plan`)
    and computes this call as the plan will (:func:`_lean_update`), so repeated calls give the same bits.
    Module dicts are read directly (``nn.Module.__getattr__`` is slow)."""
    modules = layer._modules
    base = modules["base_layer"]
    if not _hook_free_linear(base):
        return layer._add_adapters(x, base(x))
    params = base._parameters
    result = F.linear(x, params["weight"], params["bias"])
    names = layer._forward_adapters
    if len(names) == 1:
        name = names[0]
        a_mod, b_mod = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
        if calls_modules(layer, a_mod, b_mod):
            return layer._add_adapters(x, result)
        A, B = a_mod._parameters["weight"], b_mod._parameters["weight"]
        entry = layer._bt_cache.get(name)
        if not _entry_current(entry, A, B, layer.scaling[name]) or dropout_p(modules["lora_dropout"][name]) != 0.0:
            entry = _lean_entry(layer, name, A, B, result.dtype)  # None while dropout is active
            if entry is None:
                return layer._add_adapters(x, result)
        native = None
        if entry[1] >= 0 and x.dtype is result.dtype:  # not an inference tensor: the plan can follow B
            plan = layer._lean_plan = _build_lean_plan(layer, name, entry)
            native = plan[-1]  # this call computes as the plan's later calls will (the same bits)
        return _lean_update(result, x, A, entry[5], native)
    out2d, x2d = result.view(-1, result.shape[-1]), x.reshape(-1, x.shape[-1])
    for i, name in enumerate(names):
        A = modules["lora_A"]._modules[name]._parameters["weight"]
        B = modules["lora_B"]._modules[name]._parameters["weight"]
        entry = _lean_entry(layer, name, A, B, result.dtype)
        if entry is None:
            return layer._add_adapters(x, result, names[i:])  # the general path for this adapter and the rest
        add_lowrank_pretransposed_(out2d, x2d, A, entry[5])
    return result


def _build_lean_plan(layer: Linear, name: str, entry: tuple[Any, ...]) -> tuple[Any, ...]:
    """The no-grad plan :func:`try_forward` runs while ``name`` is the only adapter in use: direct references to
    every object its checks read (the base layer, its parameter and hook dicts, the adapter's modules and
    parameter dicts, ``B`` with its storage and version, the scaling, the dropout module when it has one) and
    the cached ``scaling * B.T`` (``(r, out)``) of ``entry`` (:func:`_lean_entry`), and the hook dicts of ``lora_A``
    and ``lora_B`` (a hook there sends the call to the general path, which calls them as modules).

    Checked on every call: the adapters in use (``_refresh`` makes a new tuple on any change), disabling, mixed
    batches, that each module and ``B`` is still the one held, ``B``'s storage and version, the scaling object,
    dropout in eval mode, the input and ``A`` dtypes, hooks of the base layer (and an instance ``forward``, as
    accelerate installs) or global ones, and autocast. ``_refresh``, ``train()`` and ``delete_adapter`` drop
    the plan; whatever the checks reject takes the general paths."""
    modules = layer._modules
    base = modules["base_layer"]
    a_owner, b_owner = modules["lora_A"], modules["lora_B"]
    a_mod, b_mod = a_owner._modules[name], b_owner._modules[name]
    drop = modules["lora_dropout"]._modules[name]
    B, bts = entry[0], entry[5]
    A = a_mod._parameters["weight"]
    kernel = lowrank_kernel() if B.dtype == torch.float32 and bts.device.type == "cpu" else None
    native = None if kernel is None else (kernel, bts.data_ptr(), A.shape, A.shape[1], A.shape[0], bts.shape[1])
    return (layer._forward_adapters, modules, base, base._parameters, base.__dict__, base._forward_hooks,
            base._forward_pre_hooks, a_owner, a_owner._modules, a_mod, a_mod._parameters, b_owner,
            b_owner._modules, b_mod, b_mod._parameters, B, entry[2], entry[1], name, entry[3],
            drop if type(drop) is nn.Dropout and drop.p > 0 else None, B.dtype, bts,
            a_mod._forward_pre_hooks, a_mod._forward_hooks, b_mod._forward_pre_hooks, b_mod._forward_hooks, native)


def _lean_entry(layer: Linear, name: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype
                ) -> tuple[Any, ...] | None:
    """The cached ``(B, B._version, B.data_ptr(), scaling, A, scaling * B.T)`` of adapter ``name`` of ``layer``
    (``A: (r, in)``, ``B: (out, r)``, ``scaling * B.T: (r, out)`` contiguous) for :func:`_inference_forward`,
    rebuilt when ``B`` (the same parameter, storage and version), the scaling object or ``A`` changed
    (:func:`_entry_current`; a dtype change moves ``B``'s storage); None (and nothing cached) when the adapter
    needs the general path: a tensor scaling, a bias, active dropout, a variant (DoRA, ...) or a dtype other than ``dtype``. An
    inference tensor ``B`` (made under ``torch.inference_mode``) has no version counter, so its entry is built
    for the call and not cached.

    The copy lives in ``layer._bt_cache`` while the model runs inference; ``train()``, adapter changes and
    ``delete_adapter`` drop it."""
    scaling = layer.scaling[name]
    if (type(scaling) is not float or layer.lora_B[name].bias is not None or A.dtype is not dtype
            or calls_modules(layer, layer.lora_A[name], layer.lora_B[name])
            or B.dtype is not dtype or name in layer._variants
            or dropout_p(layer.lora_dropout[name]) != 0.0):
        layer._bt_cache.pop(name, None)
        return None
    if B.is_inference():  # no version counter: in-place changes are invisible, so nothing is cached
        layer._bt_cache.pop(name, None)
        return (B, -1, B.data_ptr(), scaling, A, scaled_transpose(B.detach(), scaling))
    hit = layer._bt_cache.get(name)
    if _entry_current(hit, A, B, scaling):
        return hit
    entry = (B, B._version, B.data_ptr(), scaling, A, scaled_transpose(B.detach(), scaling))
    layer._bt_cache[name] = entry
    return entry


def _lean_update(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, bts: torch.Tensor,
                 native: tuple[Any, ...] | None) -> torch.Tensor:
    """``result += (x @ A.T) @ bts`` for the no-grad paths, in place; ``x: (..., in)``, ``A: (r, in)``,
    ``bts: (r, out)`` (``scaling * B.T``), ``result: (..., out)`` fresh from the base ``F.linear``.

    Many rows: :func:`add_lowrank_pretransposed_` (BLAS). Decode-sized inputs: the native kernel when the plan has
    one (``native = (kernel, bts address, A's shape, in, r, out)``, float32 on the CPU; the checks keep every
    address it touches in bounds), else one small matmul pair and ``add_``."""
    n = x.numel()
    if n > _FEW_ELEMENTS:
        add_lowrank_pretransposed_(result.view(-1, result.shape[-1]), x.reshape(-1, x.shape[-1]), A, bts)
        return result
    if native is not None:
        kernel, bts_ptr, a_shape, n_in, r, n_out = native
        rows = n // n_in
        if (A.shape == a_shape and A.is_contiguous() and A.is_cpu and x.is_contiguous() and x.is_cpu
                and rows * n_in == n and result.numel() == rows * n_out):
            kernel(x.data_ptr(), A.data_ptr(), bts_ptr, result.data_ptr(), rows, n_in, r, n_out)
            return result
    return result.add_(F.linear(x, A) @ bts)


def _hook_free_linear(base: nn.Module) -> bool:
    """Whether ``base`` is exactly ``nn.Linear`` with no forward hooks of its own or global ones and no instance
    ``forward`` (accelerate's hooks replace it), outside autocast: then the fast paths may compute it as
    ``F.linear`` themselves."""
    return not (type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks
                or "forward" in base.__dict__ or _GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS
                or _any_autocast())


def _entry_current(entry: tuple[Any, ...] | None, A: torch.Tensor, B: torch.Tensor, scaling: object) -> bool:
    """Whether a cached :func:`_lean_entry` still describes ``A``, ``B`` and ``scaling``: the same ``B``
    parameter with the same storage and version, the same scaling object and the same ``A``."""
    return (entry is not None and entry[0] is B and not B.is_inference() and entry[1] == B._version
            and entry[2] == B.data_ptr() and entry[3] is scaling and entry[4] is A)


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks of its own or an instance ``forward`` (accelerate): then it must be
    called as a module, not replaced by its ``weight``."""
    return bool(module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__)


def calls_modules(layer: nn.Module, lora_A: nn.Module, lora_B: nn.Module) -> bool:
    """Whether an adapter's update must run as the reference writes it, ``lora_B(lora_A(dropout(x)))`` with the
    input cast only when ``layer.cast_input_dtype_enabled``: when casting is disabled
    (:func:`peftkit.helpers.disable_input_dtype_casting`, for hooks that manage dtypes themselves, e.g. diffusers'
    layerwise casting), or when ``lora_A`` / ``lora_B`` have hooks (their own or global ones) that the fused
    paths, which read the weights directly, would skip."""
    return (not layer.cast_input_dtype_enabled or _hooked(lora_A) or _hooked(lora_B)
            or bool(_GLOBAL_FORWARD_HOOKS or _GLOBAL_FORWARD_PRE_HOOKS))


def dropout_p(dropout: nn.Module | None) -> float | None:
    """The drop probability that ``dropout`` applies now (0.0 for ``nn.Identity`` or in eval mode); None for a
    module of another kind, which the caller must run itself. (Here because the fast paths need it without
    importing the layers module; the layer's general path uses it too.)"""
    kind = type(dropout)
    if kind is nn.Identity:
        return 0.0
    if kind is nn.Dropout:
        return dropout.p if dropout.training else 0.0
    return None
