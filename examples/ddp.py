"""SAM under DistributedDataParallel on 2 local processes (gloo, CPU): per-process ε,
one averaged final gradient (flatmin.distributed.sam_step).

    python examples/ddp.py [--tiny]
"""

import torch
from digits import accuracy, arguments, load, make_model
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from flatmin import SAM
from flatmin.distributed import reduce_metrics, sam_step
from flatmin.distributed.launch import spawn


def work(rank: int, world_size: int, epochs: int, tiny: bool) -> None:
    x, y, x_test, y_test = load(tiny)
    x, y = x[rank::world_size], y[rank::world_size]  # this process's shard
    model = make_model()  # the same initial weights on every process
    ddp = DistributedDataParallel(model)
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for xb, yb in zip(x.split(32), y.split(32)):

            def closure(xb=xb, yb=yb):
                loss = F.cross_entropy(ddp(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            sam_step(opt, ddp, closure)
    metrics = reduce_metrics({"accuracy": accuracy(model, x_test, y_test)})
    if rank == 0:
        print(f"DDP (2 processes) + SAM: test accuracy {metrics['accuracy']:.3f}")


if __name__ == "__main__":
    args = arguments(__doc__)
    spawn(work, 2, args.epochs, args.tiny)
