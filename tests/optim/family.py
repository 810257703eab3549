"""The SAM-family optimizers that every contract test runs against.

Each entry builds an optimizer from (params, base optimizer class, base kwargs) with
settings under which the method really perturbs (ρ > 0). New members of the family add
one entry here and inherit the contract tests of tests/optim/test_family_contract.py.
"""

from __future__ import annotations

from flatmin import ASAM, SAM, StableSAM

FAMILY = {
    "sam": lambda params, base, **kw: SAM(params, base, rho=0.05, **kw),
    "asam": lambda params, base, **kw: ASAM(params, base, rho=0.5, **kw),
    "asam_all": lambda params, base, **kw: SAM(
        params, base, rho=2.0, adaptive="all", eta=0.0, **kw
    ),
    "usam": lambda params, base, **kw: SAM(params, base, rho=0.05, normalize=False, **kw),
    "stablesam": lambda params, base, **kw: StableSAM(params, base, rho=0.05, **kw),
}
