"""MESA under FSDP2 (DistributedMESA with a teacher sharded like the student).

The spawned processes (``fsdp_workers.mesa_run``) train with SGD + MESA, student and
teacher sharded alike with ``reshard_after_forward=False`` (so a teacher forward without
a backward leaves gathered weights behind unless they are resharded); here one process
runs MESA on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatmin import MESA
from tests.distributed.fsdp_workers import MESA_SETTINGS, MESA_STEPS, family_data, mlp

pytestmark = pytest.mark.distributed
TOLERANCE = 1e-12


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def runs(request):
    size = request.param
    out = request.getfixturevalue("fsdp_results" if size == 2 else "fsdp_results_4")
    return [torch.load(out / f"fsdp_mesa_{rank}.pt", weights_only=False) for rank in range(size)]


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_student_teacher_and_teacher_logits_equal_one_process_on_the_global_batch(runs):
    xs, ys = family_data(steps=MESA_STEPS)
    model = mlp()
    mesa = MESA(model, **MESA_SETTINGS)
    mesa.set_epoch(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(MESA_STEPS):
        logits = model(xs[step])
        loss = F.cross_entropy(logits, ys[step]) + mesa(xs[step], logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mesa.update()
        for run in runs:
            seen = run["mlp"]["steps"][step]
            assert max_difference(seen["student"], model.parameters()) < TOLERANCE
            assert max_difference(seen["teacher"], mesa.teacher.parameters()) < TOLERANCE
            expected = mesa.teacher_logits(xs[0])
            assert (seen["teacher_logits"] - expected).abs().max().item() < TOLERANCE
    assert mesa.teacher[0].weight.ne(model[0].weight).any()  # the teacher lags behind


def test_the_teacher_stays_sharded_and_each_process_holds_its_part(runs):
    for run in runs:
        assert all(step["sharded_after_forward"] for step in run["mlp"]["steps"])
    local, whole = zip(*(run["mlp"]["teacher_bytes"] for run in runs))
    assert sum(local) == whole[0]  # the parameters' shards add up to one teacher
    assert max(local) < whole[0] * (0.6 if len(runs) == 2 else 0.35)


def test_teachers_are_equal_on_every_process_batchnorm_buffers_included(runs):
    for run in runs:
        assert run["bn_mlp"]["buffer_difference"] == 0.0
        for step in range(MESA_STEPS):  # the gathered teachers, rank by rank
            teachers = [r["bn_mlp"]["steps"][step]["teacher"] for r in runs]
            assert all(max_difference(t, teachers[0]) == 0.0 for t in teachers)
