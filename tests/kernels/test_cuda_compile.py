"""Every Triton kernel compiles for an H100 (sm_90), fits its shared memory and needs no
register spills, checked on machines without a GPU: the interpreter runs the kernels'
arithmetic but never compiles them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend (ptxas)")

H100_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may opt in to on sm_90
# One case per tile class of the launchers (16-bit / fp32, D up to 64 / 128 / 256).
CASES = ["sf:float16:64", "sf:bfloat16:128", "sf:bfloat16:256", "sf:float32:64",
         "sf:float32:128", "sf:float32:256", "h2o:float16:64", "h2o:bfloat16:128",
         "h2o:float16:256", "h2o:float32:64", "h2o:float32:128", "h2o:float32:256"]
# fp32 at D = 256 runs 3xTF32 dots on [*, 256] tiles: every tile that fits spills a little.
SPILLS_ALLOWED = {("*fp32", "256")}
SF_KERNELS = {"_sf_attn_fwd_kernel", "_bwd_delta_kernel", "_sf_attn_bwd_dq_kernel",
              "_sf_attn_bwd_dkdv_kernel"}
H2O_KERNELS = {"_prefill_attention", "_prefill_column_sums", "_decode_partial", "_decode_update"}


@pytest.fixture(scope="module")
def compiled():
    script = Path(__file__).with_name("cuda_compile.py")
    root = Path(__file__).parents[2]
    # The tree first; a PYTHONPATH already set (e.g. another Triton to check) stays after it.
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)
    run = subprocess.run([sys.executable, str(script), "90", *CASES], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm90(compiled):
    names = {row["kernel"] for row in compiled}
    assert SF_KERNELS | H2O_KERNELS <= names
    for dtype in ("*bf16", "*fp16", "*fp32"):
        assert any(dtype in row["dtypes"] for row in compiled if row["kernel"] in SF_KERNELS)


def test_every_launch_asks_for_fused_multiply_adds(compiled):
    # Triton 3.9 warns that 3.10 will leave FMA contraction off by default; the kernels ask
    # for it (kernels/common.py).
    without = {r["kernel"] for r in compiled if r["options"].get("enable_fp_fusion") is not True}
    assert not without, f"launches without enable_fp_fusion=True: {sorted(without)}"


def test_shared_memory_fits_an_h100(compiled):
    too_big = [(r["kernel"], r["dtypes"], r["shared"]) for r in compiled
               if r["shared"] > H100_SHARED_BYTES]
    assert not too_big, f"kernels over {H100_SHARED_BYTES} bytes of shared memory: {too_big}"


def _register_cap(num_warps):
    # ptxas gives a thread at most 65536 / (threads per block) registers, and never over 255.
    return min(255, 65536 // (32 * num_warps))


def test_no_register_spills(compiled):
    # A spill moves tile values to local memory (DRAM behind L1) inside the inner loops; the
    # launchers' tiles are chosen so that ptxas needs none. Local memory at fewer registers
    # than the cap is not register pressure (triton 3.8's ptxas moves 12 bytes of the bf16
    # decode update at 40 registers) and is not counted.
    spilled = [(r["kernel"], r["dtypes"], r["constexprs"].get("HEAD_DIM"), r["registers"],
                r["spill_bytes"]) for r in compiled
               if r["spill_bytes"]
               and r["registers"] >= _register_cap(r["options"].get("num_warps", 4))
               and not any((dtype, r["constexprs"].get("HEAD_DIM")) in SPILLS_ALLOWED
                           for dtype in r["dtypes"])]
    assert not spilled, f"kernels that spill registers (kernel, dtypes, D, regs, bytes): {spilled}"


# The kernels whose inner loops are tile-by-tile matrix products (attention over key blocks).
# The decode step multiplies a handful of query rows and is memory-bound: not among them.
TILE_MATMUL_KERNELS = SF_KERNELS - {"_bwd_delta_kernel"} | {"_prefill_attention",
                                                             "_prefill_column_sums"}


def test_16bit_attention_runs_on_hopper_tensor_core_instructions(compiled):
    # On sm_90 Triton turns a dot into wgmma only when the tile allows it (64+ rows per
    # warpgroup); otherwise it falls back to mma.sync, the older and slower path. With 16-bit
    # inputs at D <= 128 every attention kernel's loops must get wgmma. (The dq kernel's sink
    # block, 16 rows, and tiles at D = 256, 32 rows, use mma.sync.)
    slow = [(r["kernel"], r["dtypes"], r["constexprs"]["HEAD_DIM"]) for r in compiled
            if r["kernel"] in TILE_MATMUL_KERNELS and r["wgmma"] == 0
            and ("*fp16" in r["dtypes"] or "*bf16" in r["dtypes"])
            and int(r["constexprs"]["HEAD_DIM"]) <= 128]
    assert not slow, f"16-bit attention kernels without wgmma: {slow}"


def test_decode_merges_several_splits(compiled):
    # The cross-program merge (atomic ticket, last program evicts) is compiled, not only the
    # single-split path.
    splits = {int(r["constexprs"]["SPLITS_P"]) for r in compiled if r["kernel"] == "_decode_update"}
    assert max(splits) > 1
