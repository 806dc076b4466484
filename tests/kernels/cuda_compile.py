"""Compiles every Triton kernel launch of a sinklora call for an NVIDIA GPU, on a machine
without one: the checks the interpreter cannot make (constexpr globals, types the interpreter
lets through, shared memory over the device limit, register spills).

Run as a script with ``TRITON_INTERPRET=0``: ``JITFunction.run`` is replaced by a recorder, the
public ops run on CPU tensors (launches are recorded, not executed; their outputs are garbage
and not looked at), then each recorded launch is compiled with ``triton.compile`` for the
target, from the launch's own arguments and meta-parameters, specialized as the JIT would on
a GPU. Registers and spills come from the log of the ptxas run Triton itself makes (with the
flags this Triton version passes), so every kernel is compiled afresh, never taken from the
cache; the counts of matrix instructions from the PTX. Prints one JSON line per kernel.
"""
import contextlib
import io
import json
import os
import re
import sys

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton._C.libtriton import native_specialize_impl as specialize
from triton.runtime.jit import JITFunction

OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")

launches = []


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def _signature(fn, args, kwargs):
    """Types, constexprs and divisibility attributes of one launch, from Triton's own
    specializer: the kernel compiled here is the one the JIT would build on a GPU (16-byte
    aligned pointers and multiples of 16 get ``tt.divisibility``, which vectorizes loads)."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in OPTION_NAMES})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name] if param.name in bound else param.default
        if param.is_constexpr:
            kind, spec = "constexpr", value
        else:
            kind, spec = specialize(BaseBackend, value, False, not param.do_not_specialize,
                                    not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif spec:
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def ptxas_usage(log):
    """``(registers, spill bytes stored + loaded)`` from the ptxas log of one kernel."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)) + int(spills.group(2))


def compile_launches(target):
    results, seen = [], set()
    for fn, args, kwargs in launches:
        signature, constexprs, attrs = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs.items())),
               tuple(kwargs.get(k) for k in OPTION_NAMES))
        if key in seen:
            continue
        seen.add(key)
        options = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log it was asked for
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options)
        registers, spills = ptxas_usage(log.getvalue())
        ptx = compiled.asm["ptx"]
        results.append({"kernel": fn.__name__, "triton": triton.__version__,
                        "shared": compiled.metadata.shared,
                        "registers": registers, "spill_bytes": spills,
                        # Matrix instructions: Hopper's wgmma, or the older mma.sync.
                        "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
                        "options": options,
                        "dtypes": sorted({t for t in signature.values() if t.startswith("*")}),
                        "constexprs": {k: repr(v) for k, v in constexprs.items()}})
    return results


def _sf_attention_calls(dtype, head_dim):
    from sinklora.sf_attn.op import sf_attn_bwd, sf_attn_fwd

    b, hq, hkv, n = 1, 4, 2, 300
    q = torch.randn(b, hq, n, head_dim, dtype=dtype)
    k, v = torch.randn(b, hkv, n, head_dim, dtype=dtype), torch.randn(b, hkv, n, head_dim, dtype=dtype)
    o, lse = sf_attn_fwd(q, k, v, 64, 4, 2, False, 0.1)
    sf_attn_bwd(torch.randn_like(o), q, k, v, o, lse, 64, 4, 2, False, 0.1)


def _h2o_calls(dtype, head_dim):
    from sinklora import h2o_decode, h2o_prefill
    from sinklora.h2o import ops

    # CPU tensors whose launches are recorded, not run: neither the device nor the
    # interpreter's bf16 limit applies.
    ops.resolve_backend = lambda backend, tensor, name: "triton"
    # One (sequence, kv head) and a long state: the decode step splits it over several programs.
    b, hq, hkv, n = 1, 4, 1, 300
    q = torch.randn(b, hq, n, head_dim, dtype=dtype)
    k, v = torch.randn(b, hkv, n, head_dim, dtype=dtype), torch.randn(b, hkv, n, head_dim, dtype=dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, :3] = False
    budget = dict(heavy_budget=100, recent_budget=100, num_sink=4)
    _, state = h2o_prefill(q, k, v, padding_mask=mask, backend="triton", **budget)
    h2o_decode(q[:, :, 0], state, k[:, :, 0], v[:, :, 0], backend="triton", **budget)


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET=0: the interpreter does not compile")
    # Read by Triton at compile time: a cached kernel would come without a ptxas log.
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    cases = sys.argv[2:] or ["sf:bfloat16:128", "sf:float32:64", "h2o:bfloat16:128"]
    JITFunction.run = _record
    calls = {"sf": _sf_attention_calls, "h2o": _h2o_calls}
    for case in cases:
        op, dtype, head_dim = case.split(":")
        calls[op](getattr(torch, dtype), int(head_dim))
    for row in compile_launches(GPUTarget("cuda", arch, 32)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
