"""`Launch`: Triton launches that skip Triton's binder once a call's specialisation has been seen.

`JITFunction.run` binds every argument, asks Triton's C specialiser about each (dtype, 16-byte
alignment, integer width and divisibility), hashes the lot into its kernel cache key, then
launches: 35 us of host per launch on the H100 machines (2026-11-28), `Tuned`'s own key on top,
~170 us a launch all told for the lightning kernels of ~40 arguments, which made LASP-2 at 32k
tokens per GPU wait on its host (docs/benchmarks, 23rd session). Here a launch is keyed by facts
at least as fine as Triton's: each tensor's dtype and address modulo 16, every other argument's
class and value (for Triton's `do_not_specialize` integers only the width Triton picks for them),
the keyword arguments (constexprs, launch options), the current device. The first call under a
key goes through Triton (compiling, tuning) and its compiled kernel is remembered with the
arguments that follow the positional ones; later calls launch it through its own launcher. On 2
H200 (2026-11-28, 24th session, same machine): LASP-2's host per fwd+bwd at 32k tokens per GPU
2.74 -> 2.28 ms, its efficiency at 64k 0.77-0.79 -> 0.93.

Not covered, as with Triton's own cache between processes: changing a `TRITON_*` knob or a global
a kernel reads while the process runs. Launches whose runtime arguments are not all positional,
whose grid reads more than the keyword arguments (and the config's), or whose compiled kernel
Triton does not return (the interpreter) always take Triton's path.
"""
from __future__ import annotations

import inspect

import torch

LIMIT = 256  # remembered keys per kernel: packed batches bring new lengths (integers) every step


class Launch:
    """`fn[grid](*args, **kwargs)` of a `@triton.jit` function through its compiled kernels.

    `exact`: parameter names keyed by value even where Triton does not specialise on them (the
    autotuner's key: its pick depends on them). `device`: the current device's index (tests)."""

    def __init__(self, fn, exact=(), device=None):
        self.fn = fn
        self._device = device or _cuda_device
        self._known = {}
        params = getattr(fn, "params", None)
        self._facts = None
        if params and (device is not None or _compiles(fn)):
            runtime = [p.num for p in params if not p.is_constexpr]
            self._n = runtime[-1] + 1 if runtime else 0
            self._facts = _facts_function([_fact(p, p.name in exact) for p in params[:self._n]])
            self._rest = params[self._n:]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def forget(self):
        self._known.clear()

    def run(self, grid, args, kwargs, first=None):
        """Launch; `first(grid, args, kwargs) -> (kernel, extra keyword arguments or None)` replaces
        Triton's own path for a new key (`Tuned`: the autotuner's pick); None: not to remember."""
        key = self._key(args, kwargs)
        try:
            hit = self._known.get(key)
        except TypeError:  # an unhashable argument
            hit = key = None
        if hit is not None:
            kernel, tail, meta = hit
            try:
                size = _three(grid(meta) if callable(grid) else grid)
            except KeyError:  # the grid reads a positional argument by name: Triton's path below
                size = None
            if size is not None:
                kernel[size](*args, *tail)
                return kernel
        if first is None:
            kernel, extra = self.fn.run(*args, grid=grid, warmup=False, **kwargs), {}
        else:
            kernel, extra = first(grid, args, kwargs)
        if key is not None and extra is not None:
            self._remember(key, kernel, {**kwargs, **extra})
        return kernel

    def _key(self, args, kwargs):
        if self._facts is None or len(args) != self._n:
            return None
        return self._facts(*args), tuple(kwargs.items()), self._device()

    def _remember(self, key, kernel, meta):
        if kernel is None or not hasattr(kernel, "__getitem__"):
            return
        tail = []
        for p in self._rest:
            if p.name in meta:
                tail.append(meta[p.name])
            elif p.default is not inspect.Parameter.empty:
                tail.append(p.default)
            else:
                return  # Triton itself will name the missing argument
        if len(self._known) >= LIMIT:
            self._known.clear()
        self._known[key] = (kernel, tuple(tail), meta)


def _three(grid):
    n = len(grid)  # Triton's own path pads the grid; a compiled kernel's launcher takes three
    return grid if n == 3 else (grid[0], grid[1] if n > 1 else 1, 1)


def _cuda_device() -> int:
    # -1 before torch has touched CUDA: no kernel can have run on a device then
    return torch.cuda.current_device() if torch.cuda.is_initialized() else -1


def _compiles(fn) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(fn, JITFunction)  # the interpreter's stand-in is not one: it returns no kernel


def _fact(param, exact: bool) -> str:
    """The expression for argument `a{num}`'s part of the key."""
    a = f"a{param.num}"
    if param.is_constexpr or exact or not param.do_not_specialize:
        other = f"({a}.__class__, {a})"
    else:  # Triton keeps one kernel for every value of the integer's width (i32, i64, u64)
        other = (f"({a}.__class__, -2147483648 <= {a} <= 2147483647, {a} <= 9223372036854775807) "
                 f"if {a}.__class__ is int else ({a}.__class__, {a})")
    return f"({a}.dtype, {a}.data_ptr() & 15) if isinstance({a}, Tensor) else {other}"


def _facts_function(parts):
    """A function of the positional arguments returning their facts, written out per kernel (as
    Triton writes its binder): no loop, no per-argument call."""
    names = ", ".join(f"a{i}" for i in range(len(parts)))
    body = "".join(f"\n        ({p})," for p in parts)
    source = f"def facts({names}):\n    return ({body}\n    )\n"
    scope = {"Tensor": torch.Tensor}
    exec(compile(source, "<seqpar.kernels.launch>", "exec"), scope)
    return scope["facts"]
