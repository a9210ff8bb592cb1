"""TMA loads for the Triton kernels: whether a launch may read its blocks through device-side tensor
descriptors (`tl.make_tensor_descriptor`), and the scratch those descriptors live in.

On Hopper the copy engine then fetches a kernel's next blocks without registers or address math,
and a block past a descriptor's shape reads zeros, so a descriptor over one document's rows needs no
mask. Each kernel family decides its default from what it measured (`use_tma(default_on=...)`);
SEQPAR_TMA=0 turns every family's off, =1 forces it on (in the interpreter too).
"""
from __future__ import annotations

import functools
import os

import torch
import triton

ENV = "SEQPAR_TMA"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_tma(*tensors: torch.Tensor, default_on: bool = True) -> bool:
    """Whether a launch reading `tensors` loads through TMA descriptors: SEQPAR_TMA=1 or, unset,
    `default_on` on sm_90 and later; never where a base or a stride but the last is not 16-byte
    aligned (TMA's rule) or with SEQPAR_TMA=0."""
    flag = os.environ.get(ENV, "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"{ENV}={flag!r}: need 0 (pointer loads) or 1 (TMA descriptors); unset: each kernel's "
                         "measured default (TMA on sm_90 and later where it was faster)")
    t0 = tensors[0]
    if flag == "0" or (flag == "" and not (default_on and t0.device.type == "cuda" and _hopper_or_later(t0.device))):
        return False
    if any(t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]) for t in tensors):
        return False
    triton.set_allocator(_descriptor_scratch)  # where device-side descriptors live (128 B each)
    return True


def _hopper_or_later(device: torch.device) -> bool:
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:  # once per device: use_tma runs on every launch
    return torch.cuda.get_device_capability(index)[0]


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if _interpreting() else "cuda")
