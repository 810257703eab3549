"""timm (row 8 of issue 15's table): its factories as the base, the family in its registry.

timm imports torchvision, which must be built for the installed torch; where it is not
(PyPI's torchvision next to a CPU torch fails with a RuntimeError, not an ImportError),
these tests skip with the reason. The callable-base tests that need no timm are in
tests/optim/test_base.py (``functools.partial``, what timm's factory returns).
"""

from __future__ import annotations

import pytest
import torch

from flatmin import GSAM, SAM
from tests.integrations.helpers import SAM_SETTINGS, assert_same_training, batches, make_net

try:
    import timm.optim
except Exception as error:
    pytest.skip(
        f"timm cannot be imported here ({type(error).__name__}: {error}); it needs a "
        "torchvision built for the installed torch",
        allow_module_level=True,
    )

from flatmin.integrations.timm import FAMILY, register_timm_optimizers


def train(net, opt):
    for x, y in batches():
        opt.zero_grad()
        opt.step(
            lambda x=x, y=y: (l := torch.nn.functional.cross_entropy(net(x), y)).backward() or l
        )
    return net


def test_timm_s_factory_as_the_base_optimizer():
    net, reference = make_net(), make_net()
    opt = SAM(net.parameters(), timm.optim.get_optimizer_class("sgd"), model=net, **SAM_SETTINGS)
    ref = SAM(
        reference.parameters(), torch.optim.SGD, model=reference, nesterov=True, **SAM_SETTINGS
    )
    assert_same_training(train(net, opt), train(reference, ref))


def test_registered_members_build_around_timm_s_bases():
    names = register_timm_optimizers()
    assert {"samsgd", "samadamw", "gsamsgd", "looksamadam"} <= set(names)
    assert set(names) <= set(timm.optim.list_optimizers("*sam*"))
    net, reference = make_net(), make_net()
    opt = timm.optim.create_optimizer_v2(
        net, "samsgd", lr=0.1, rho=0.05, model=net, weight_decay=0.0
    )
    ref = SAM(
        reference.parameters(), torch.optim.SGD, model=reference, nesterov=True, **SAM_SETTINGS
    )
    assert_same_training(train(net, opt), train(reference, ref))
    opt = timm.optim.create_optimizer_v2(
        make_net(), "gsamadamw", lr=1e-3, weight_decay=0.05, alpha=0.3
    )
    assert isinstance(opt, GSAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.alpha == 0.3 and sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_names_with_an_underscore_are_refused():
    with pytest.raises(ValueError, match="'_'"):
        register_timm_optimizers({"my_sam": FAMILY["sam"]}, bases=("sgd",))
