"""DistributedMESA on one process (the two-process runs are in test_ddp_checkpoint.py)."""

import pytest
import torch

from flatmin.distributed.mesa import DistributedMESA
from flatmin.trajectory import EMA, MESA
from tests.trajectory.helpers import bn_mlp, move_student


def test_update_takes_the_ema_step_of_a_built_teacher():
    model = bn_mlp(dtype=torch.float64)
    wrapped = DistributedMESA(MESA(model, decay=0.5))
    before = wrapped.teacher[0].weight.clone()
    move_student(model, torch.randn(8, 4, dtype=torch.float64))
    wrapped.update()
    torch.testing.assert_close(wrapped.teacher[0].weight, 0.5 * before + 0.5 * model[0].weight)
    assert wrapped.mesa.ema.num_updates == 1


def test_update_leaves_a_teacher_you_keep_to_you():
    model = bn_mlp()
    ema = EMA(model, decay=0.5)
    wrapped = DistributedMESA(MESA(model, teacher=ema))
    before = ema.module[0].weight.clone()
    move_student(model, torch.randn(8, 4))
    wrapped.update()  # synchronizes the statistics only; no error, no step
    assert torch.equal(ema.module[0].weight, before) and ema.num_updates == 0


def test_statistics_setting_is_checked():
    with pytest.raises(ValueError, match="statistics must be one of 'mean', 'broadcast', 'none'"):
        DistributedMESA(MESA(bn_mlp()), statistics="average")
    with pytest.raises(TypeError, match=r"expected a flatmin\.MESA"):
        DistributedMESA(bn_mlp())
