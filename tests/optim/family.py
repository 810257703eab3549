"""The SAM-family optimizers that every contract test runs against.

Each entry builds an optimizer from (params, base optimizer class, base kwargs) with
settings under which the method really perturbs (ρ > 0). New members of the family add
one entry here and inherit the contract tests of tests/optim/test_family_contract.py.
"""

from __future__ import annotations

from flatmin import ASAM, ESAM, GSAM, SAM, LookSAM, StableSAM

FAMILY = {
    "sam": lambda params, base, **kw: SAM(params, base, rho=0.05, **kw),
    "asam": lambda params, base, **kw: ASAM(params, base, rho=0.5, **kw),
    "asam_all": lambda params, base, **kw: SAM(
        params, base, rho=2.0, adaptive="all", eta=0.0, **kw
    ),
    "usam": lambda params, base, **kw: SAM(params, base, rho=0.05, normalize=False, **kw),
    "stablesam": lambda params, base, **kw: StableSAM(params, base, rho=0.05, **kw),
    # GSAM with its LR-driven radius and the orthogonal correction both active.
    "gsam": lambda params, base, **kw: GSAM(params, base, rho=0.05, alpha=0.4, rho_min=0.01, **kw),
    # Full steps only (k = 1): under bf16 autocast the reused direction g_v, a small
    # difference of two gradients, is rounding noise, so reuse steps cannot meet the
    # autocast tolerance. test_looksam.py runs the other contracts with k = 2.
    "looksam": lambda params, base, **kw: LookSAM(params, base, rho=0.05, k=1, alpha=0.7, **kw),
    # SAM-style closures: stochastic weight perturbation only (data selection needs
    # per-sample losses; tests/optim/test_esam.py covers it).
    "esam": lambda params, base, **kw: ESAM(
        params, base, rho=0.05, beta=0.6, gamma=1.0, seed=0, **kw
    ),
}
