"""Which attention implementation a program uses: the XLA reference code or the
project's Pallas kernels, chosen per platform when the program is lowered.

Data flow:
  1. The engine reads `LOONG_JAX_ATTENTION` once, when it is built
     (`attention_impl_from_env`), and passes the value down to every program
     builder as a static argument (`impl`). Nothing else is read from the
     environment and nothing is stored globally.
  2. At each attention call, `by_platform(impl, reference, kernel, *args)`:
       - "auto" (the default): `jax.lax.platform_dependent` stages both
         branches; lowering for CUDA keeps only the Pallas Triton kernel,
         lowering for any other platform (CPU) only the reference code, so
         the CPU program is exactly what it was before the kernels existed;
       - "interpret": the kernels run in Pallas interpret mode on any
         platform (how CPU tests cover them);
       - "reference": the XLA code everywhere;
       - "kernel": the compiled kernels only. An engine settles "auto" once for the platform of
         its devices (`for_platform`), so its programs stage one branch, not both.
  3. A call site whose static shapes a kernel cannot tile (see the kernels'
     `supports`) passes kernel=None and always gets the reference code.
  4. Inside `jax.shard_map` a kernel's inputs are cast to vary alike
     (`varying_alike`) and its outputs declared so (`kernel_output`); the
     interpreter needs the shard_map's `check_vma` off (`checks_vma`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping

import jax

ATTENTION_ENV = "LOONG_JAX_ATTENTION"
AUTO = "auto"  # kernels on CUDA, reference code elsewhere
INTERPRET = "interpret"  # kernels everywhere, in Pallas interpret mode
REFERENCE = "reference"  # reference code everywhere
KERNEL = "kernel"  # the compiled kernels only (what "auto" becomes on GPU devices)
IMPLS = (AUTO, INTERPRET, REFERENCE, KERNEL)


def check_impl(impl: str) -> str:
    """`impl` itself, or a ValueError naming the accepted values."""
    if impl not in IMPLS:
        raise ValueError(f"attention implementation must be one of {IMPLS}, got {impl!r}")
    return impl


def attention_impl_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The implementation `LOONG_JAX_ATTENTION` names ("auto" when unset or empty)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ATTENTION_ENV, "").strip().lower() or AUTO
    if value not in IMPLS:
        raise ValueError(f"{ATTENTION_ENV}={value!r}: expected one of {IMPLS}")
    return value


def for_platform(impl: str, platform: str) -> str:
    """`impl` with "auto" settled for programs that run on `platform` devices ("gpu", "cpu", ...):
    the program then stages one branch only, not both (tracing an unused kernel per layer costs
    compile time)."""
    if check_impl(impl) != AUTO:
        return impl
    return KERNEL if platform in ("gpu", "cuda") else REFERENCE


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def varying_alike(*inputs) -> tuple:
    """The inputs of a pallas_call, each cast to vary over every manual mesh axis any of them varies
    over (inside `jax.shard_map`; outside, unchanged), as the kernel body mixes them all."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs if x is not None))
    if not varying:
        return inputs

    def cast(x):
        missing = tuple(sorted(varying - jax.typeof(x).manual_axis_type.varying))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return tuple(None if x is None else cast(x) for x in inputs)


def kernel_output(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """The out_shape of a pallas_call, varying over the manual mesh axes `like` (an input) varies over."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def checks_vma(impl: str) -> bool:
    """The `check_vma` of a `jax.shard_map` around attention calls: Pallas' interpreter mixes
    per-member blocks with grid indices that vary over no mesh axis, which the check rejects."""
    return check_impl(impl) != INTERPRET


def by_platform(impl: str, reference: Callable, kernel: Callable | None, *args):
    """reference(*args) or kernel(*args, interpret=...) as `impl` and the lowering platform say.

    Both callables return the same pytree of arrays (shapes and dtypes)."""
    check_impl(impl)
    if kernel is None or impl == REFERENCE:
        return reference(*args)
    if impl in (INTERPRET, KERNEL):
        return kernel(*args, interpret=impl == INTERPRET)
    return jax.lax.platform_dependent(*args, cuda=functools.partial(kernel, interpret=False), default=reference)
