"""The step methods run eagerly: compiling the step works or refuses before anything moves."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from flatmin import SAM
from tests.optim.helpers import FAMILY, batches, bn_net, same, snapshot, state_equal


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["sam", "gsam", "looksam"])
def test_compiled_step_equals_the_eager_step(name):
    data = batches(3)
    runs = []
    for compiled in (False, True):
        model = bn_net()
        opt = FAMILY[name](model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, model=model)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        losses = [step(_closure(model, x, y)) for x, y in data]
        runs.append((snapshot(model), opt.state_dict(), torch.stack(losses)))
    (w1, s1, l1), (w2, s2, l2) = runs
    assert same(w1, w2) and state_equal(s1, s2) and torch.equal(l1, l2)


def test_fullgraph_compile_of_the_step_refuses_before_touching_anything():
    model = bn_net()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, model=model)
    (x0, y0), (x1, y1) = batches(2)
    opt.step(_closure(model, x0, y0))
    weights, state = snapshot(model), copy.deepcopy(opt.state_dict())
    step = torch.compile(opt.step, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="compile the model"):
        step(_closure(model, x1, y1))
    assert same(snapshot(model), weights)
    assert state_equal(opt.state_dict(), state)
    assert not opt.is_perturbed


def test_compiled_model_with_sam_equals_the_eager_model():
    data = batches(4)
    runs = []
    for compiled in (False, True):
        model = bn_net()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, model=model)
        for x, y in data:
            opt.step(_closure(forward, x, y))
        runs.append(snapshot(model))
    for key, value in runs[0].items():
        torch.testing.assert_close(runs[1][key], value, rtol=0, atol=1e-6)
    assert runs[1]["1.num_batches_tracked"].item() == len(data)


def test_importing_the_optimizers_does_not_import_the_compiler():
    """torch._dynamo costs about a second and 70 MB: only a user who compiles pays it."""
    code = "import sys, flatmin.optim; print('torch._dynamo' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
