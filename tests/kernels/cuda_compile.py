"""Compiles every Triton kernel launch of a sinklora call for an NVIDIA GPU, on a machine
without one: the checks the interpreter cannot make (constexpr globals, types the interpreter
lets through, shared memory over the device limit).

Run as a script with ``TRITON_INTERPRET=0``: ``JITFunction.run`` is replaced by a recorder, the
public ops run on CPU tensors (launches are recorded, not executed; their outputs are garbage
and not looked at), then each recorded launch is compiled with ``triton.compile`` for the
target, from the launch's own arguments and meta-parameters. Prints one JSON line per kernel.
"""
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas")

launches = []


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def _signature(fn, args, kwargs):
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in OPTION_NAMES})
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name] if param.name in bound else param.default
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {param.name}={value!r}")
    return signature, constexprs


def compile_launches(target):
    results, seen = [], set()
    for fn, args, kwargs in launches:
        signature, constexprs = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(signature.items())), repr(sorted(constexprs.items())),
               tuple(kwargs.get(k) for k in OPTION_NAMES))
        if key in seen:
            continue
        seen.add(key)
        options = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs}
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target,
                                  options=options)
        results.append({"kernel": fn.__name__, "shared": compiled.metadata.shared,
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

    ops.resolve_backend = lambda backend, device: "triton"  # CPU tensors, recorded launches
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
