"""Result files of the paper experiments (``context_extension``, ``h2o_quality``).

Each run writes ``<results dir>/<name>.csv`` (one row per measured configuration, every row
carrying the device, versions, git sha, corpus and timestamp), ``<name>.md`` (the environment
and the tables as printed) and ``<name>.png``. The ``--preset cpu`` and ``--smoke`` runs
write ``<name>_cpu.*`` and ``<name>_smoke.*`` instead, so that their numbers are never
mistaken for the GPU experiment's. Files are rewritten by each run.
"""
from pathlib import Path

from bench import common

# What a result file's setup line and a figure's title add for each preset.
PRESET_MARKS = {"gpu": "", "cpu": " -- CPU PRESET: a smaller model than the GPU experiment",
                "smoke": " -- SMOKE RUN: sizes too small to mean anything"}
ENV_COLUMNS = ["device", "torch", "triton", "transformers", "python", "corpus", "git_sha",
               "timestamp"]


def output_paths(results_dir, name, preset):
    """``{"csv", "md", "png"}`` paths of the result files of ``name`` run with ``preset``."""
    stem = Path(results_dir) / (name if preset == "gpu" else f"{name}_{preset}")
    return {ext: stem.with_suffix(f".{ext}") for ext in ("csv", "md", "png")}


def write_results(path, columns, rows, env):
    """Writes ``rows`` (dicts keyed by ``columns``) with the environment columns appended, the
    run's start as ``timestamp``, replacing the file. Floats in full: ratios recomputed from the
    CSV must match the script's."""
    common.write_csv(path, [{**row, **env, "timestamp": env["run_id"]} for row in rows],
                     [*columns, *ENV_COLUMNS], append=False, float_format=repr)


def write_markdown(path, title, lines):
    """Writes ``# title`` and ``lines`` (paragraphs and tables) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + "\n\n".join(lines) + "\n")


def save_figure(fig, path, env, preset):
    """Stamps ``fig`` with where it was measured (and the preset when it is not the GPU one),
    saves it to ``path`` as PNG and closes it."""
    import matplotlib.pyplot as plt

    mark = PRESET_MARKS[preset].removeprefix(" -- ")
    fig.suptitle((f"{mark}; " if mark else "")
                 + f"{env['device']}, git {env['git_sha']}, {env['run_id']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_std(values):
    """``(mean, sample std)`` of ``values``; the std is ``None`` for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def fmt_spread(values, digits=3):
    """``mean ± sample std`` of ``values`` (just the mean when there is one value)."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
