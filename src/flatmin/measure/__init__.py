"""Sharpness diagnostics: how flat is a minimum, measured without changing the model.

- :func:`sam_sharpness` — SAM's ``L(w+ε) − L(w)``, one-step or projected ascent, and
  m-sharpness (Foret et al., 2021);
- :func:`hessian_eigenvalues` — Lanczos with full reorthogonalization or power
  iteration, with residuals and a convergence flag;
- :func:`hessian_trace` — Hutch++ or Hutchinson, with a standard error;
- :func:`loss_landscape` — 1-D/2-D filter-normalized random directions (Li et al.,
  2018) or the interpolation between two checkpoints;
- :func:`gaussian_noise_curve` — the loss under Gaussian weight noise scaled to the
  weights' norm (the SAF paper's Figure 4).

Every function differentiates or perturbs only the parameters with ``requires_grad``,
draws its data once (a shuffling or augmenting loader cannot change the function being
measured midway) and averages the loss over batches weighted by batch size. It
evaluates in eval mode (``train_mode_bn=True`` lets BatchNorm use batch
statistics), uses a private ``torch.Generator``, and leaves the model's modes, weights,
gradients, buffers and ``requires_grad`` flags exactly as they were, also when it
raises. Results are dataclasses that say how many samples (and which seed) they used.
"""

from flatmin.measure.hessian import EigenResult, TraceResult, hessian_eigenvalues, hessian_trace
from flatmin.measure.landscape import LandscapeResult, loss_landscape
from flatmin.measure.noise import NoiseCurveResult, gaussian_noise_curve
from flatmin.measure.sharpness import SharpnessResult, sam_sharpness

__all__ = [
    "EigenResult",
    "LandscapeResult",
    "NoiseCurveResult",
    "SharpnessResult",
    "TraceResult",
    "gaussian_noise_curve",
    "hessian_eigenvalues",
    "hessian_trace",
    "loss_landscape",
    "sam_sharpness",
]
