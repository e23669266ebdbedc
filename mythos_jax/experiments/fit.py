"""The saturating-exponential law of test-time depth: ``L(T) = L_inf + Z * exp(-z T)``.

For a fixed rate z the best (L_inf, Z) is a linear least-squares problem, so the fit scans z
on a log grid (then refines around the best) and keeps the least squared error: no iterative
optimiser, no starting point to choose, the same answer every time.
"""

from __future__ import annotations

import numpy as np


def fit_saturating_exponential(loops, losses) -> dict[str, float]:
    """``{"L_inf", "Z", "z", "r2"}`` of the least-squares fit to points (T, L(T));
    needs at least 3 points with distinct T."""
    t = np.asarray(loops, np.float64)
    y = np.asarray(losses, np.float64)
    if t.shape != y.shape or len(np.unique(t)) < 3:
        raise ValueError(f"need >= 3 points with distinct loop counts, got {t.tolist()}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"losses must be finite, got {y.tolist()}")
    rates = np.geomspace(1e-3, 10.0, 400)
    best = min(_solve(t, y, z) for z in rates)
    fine = np.geomspace(best[1] / 1.05, best[1] * 1.05, 200)
    sse, z, l_inf, amplitude = min([best] + [_solve(t, y, rate) for rate in fine])
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - sse / total if total > 0 else 1.0
    return {"L_inf": float(l_inf), "Z": float(amplitude), "z": float(z), "r2": float(r2)}


def _solve(t: np.ndarray, y: np.ndarray, z: float) -> tuple[float, float, float, float]:
    """(squared error, z, L_inf, Z) of the best linear fit at rate z."""
    design = np.stack([np.ones_like(t), np.exp(-z * t)], axis=1)
    (l_inf, amplitude), *_ = np.linalg.lstsq(design, y, rcond=None)
    sse = float(np.sum((design @ np.array([l_inf, amplitude]) - y) ** 2))
    return sse, float(z), float(l_inf), float(amplitude)
