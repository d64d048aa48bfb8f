"""Build (once, cached) and load the fused C++ step kernels; None when unavailable.

The kernels need a C++ compiler and ninja at first use (about a minute, then cached under
~/.cache/torch_extensions). Without them, or with GRU_LM_NO_EXT=1, the scratch cells run
the portable PyTorch loops of gru_lm/cells.py: same results, slower.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

_STATE: dict[str, object] = {}
SOURCE = Path(__file__).with_name("csrc") / "cells.cpp"


def kernels(load: bool = True):
    """The compiled module, or None (reason in `why_not()`); load=False never builds."""
    if "mod" in _STATE or not load:
        return _STATE.get("mod")
    mod = None
    if os.environ.get("GRU_LM_NO_EXT", "").strip() in {"1", "true", "yes"}:
        _STATE["why"] = "disabled by GRU_LM_NO_EXT"
    else:
        try:
            from torch.utils.cpp_extension import load

            _put_ninja_on_path()

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # -fopenmp makes at::parallel_for parallel; libgomp is torch's own
                # (same soname, already loaded), so there is one OpenMP runtime.
                mod = load(name="gru_lm_cells_v1", sources=[str(SOURCE)],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, no headers: fall back, say why
            _STATE["why"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}" \
                if str(e).strip() else type(e).__name__
    _STATE["mod"] = mod
    return mod


def _put_ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the pip package's binary is not there unless the
    venv is activated, so add its folder."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def why_not() -> str | None:
    kernels()
    return _STATE.get("why")  # type: ignore[return-value]
