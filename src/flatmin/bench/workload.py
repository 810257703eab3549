"""The speed benchmark's workload: one method training its own model on synthetic data.

A :class:`SpeedCase` is a model with synthetic inputs and labels (speed does not depend
on the values); a :class:`MethodRunner` builds a method through the registry exactly as
``flatmin train`` does and trains it one block (an "epoch" of ``steps`` steps) at a
time with the trainer's step, ``method.train_step(...)``. Every method runs in its
steady state: SAF and MESA start their term at once (``start_epoch = 0``) and SAF's
store is filled for ``Ẽ`` epochs before timing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from flatmin.train.method import MethodContext
from flatmin.train.registry import get_method


@dataclass(frozen=True)
class SpeedCase:
    """A model on synthetic data: ``num_samples`` is the real dataset's size (it sizes
    SAF's store); a timed block is ``steps`` steps of ``batch_size``."""

    name: str
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_samples: int
    batch_size: int
    steps: int
    channels_last_inputs: bool = False  # 4-D batches in channels_last, weights as built


CASES = {
    "resnet18": SpeedCase("resnet18-cifar", "resnet18", (3, 32, 32), 10, 50_000, 32, 5),
    "cnn": SpeedCase("cnn-28x28", "cnn", (1, 28, 28), 10, 60_000, 128, 10),
    "cnn1d": SpeedCase("cnn1d-mnist1d", "cnn1d", (1, 40), 10, 4_000, 128, 20),
}


CASES = {
    "resnet18": SpeedCase("resnet18-cifar", "resnet18", (3, 32, 32), 10, 50_000, 32, 5),
    "cnn": SpeedCase("cnn-28x28", "cnn", (1, 28, 28), 10, 60_000, 128, 10),
    "cnn1d": SpeedCase("cnn1d-mnist1d", "cnn1d", (1, 40), 10, 4_000, 128, 20),
}


class MethodRunner:
    """One method training its own copy of the model, a block (epoch) at a time."""

    def __init__(self, case: SpeedCase, method_name: str, base_model: nn.Module) -> None:
        spec = get_method(method_name)
        self.name = method_name
        self.case = case
        self.model = copy.deepcopy(base_model).train()
        given = {
            h.name: 0
            for h in spec.hyperparameters
            if h.name == "start_epoch"  # SAF/MESA: the term is on in every timed block
        }
        context = MethodContext(num_samples=case.num_samples, num_classes=case.num_classes)
        self.method = spec.create(self.model, given, context)
        self.criterion = nn.CrossEntropyLoss(reduction="none")  # per sample, as the trainer
        generator = torch.Generator().manual_seed(0)
        n = case.steps * case.batch_size
        self.x = torch.randn((n, *case.input_shape), generator=generator)
        self.y = torch.randint(0, case.num_classes, (n,), generator=generator)
        if case.channels_last_inputs and self.x.dim() == 4:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.epoch = 0
        lag = int(spec.resolve(given).get("lag_epochs", 0))
        for _ in range(lag):  # fill SAF's store so that timed steps find their targets
            self.block()

    def block(self) -> tuple[float, float]:
        """One epoch over the synthetic set; returns images per wall second and per
        process-CPU second."""
        self.method.set_epoch(self.epoch)
        b = self.case.batch_size
        started, cpu_started = time.perf_counter(), time.process_time()
        for step in range(self.case.steps):
            index = torch.arange(step * b, (step + 1) * b)
            self.method.train_step(self.model, self.x[index], self.y[index], index, self.criterion)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        self.epoch += 1
        images = self.case.steps * b
        return images / elapsed, images / max(cpu, 1e-9)

    def extra_memory_bytes(self) -> int:
        return int(self.method.extra_memory_bytes(self.model))
