"""The package's import structure: the kernels and the functional ops need only torch and
triton; the Hugging Face names say what they need when transformers or peft is missing."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_HF = textwrap.dedent("""
    import sys
    sys.modules["transformers"] = None  # import transformers now fails as if not installed
    sys.modules["peft"] = None
    import torch
    import sinklora
    import sinklora.kernels.sf_attn, sinklora.kernels.h2o_decode, sinklora.kernels.h2o_prefill

    q, k, v = (torch.randn(1, h, 12, 16) for h in (4, 2, 2))
    assert sinklora.sf_attention(q, k, v, group_size=4).shape == q.shape
    out, state = sinklora.h2o_prefill(q, k, v, heavy_budget=4, recent_budget=2)
    sinklora.h2o_decode(q[:, :, 0], state, k[:, :, 0], v[:, :, 0], heavy_budget=4,
                        recent_budget=2)
    for name in sinklora.HF_NAMES:
        try:
            getattr(sinklora, name)
        except ImportError as exc:
            assert "needs transformers and peft" in str(exc), exc
        else:
            raise SystemExit(f"sinklora.{name} without transformers gave no ImportError")
    loaded = [m for m, mod in sys.modules.items()
              if mod is not None and m.split(".")[0] in ("transformers", "peft")]
    assert not loaded, loaded
    print("ok")
""")


def test_kernels_and_ops_work_without_transformers_or_peft():
    run = subprocess.run([sys.executable, "-c", WITHOUT_HF], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_import_registers_the_attention_when_transformers_is_there():
    import transformers

    import sinklora

    assert sinklora.hf.ATTN_NAME in transformers.AttentionInterface._global_mapping
    assert sinklora.H2OCache is sinklora.hf.H2OCache
