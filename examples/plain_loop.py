"""SAM in your own loop: the optimizer gets the model once, step(closure) does both passes.

python examples/plain_loop.py [--tiny]
"""

import torch
from digits import accuracy, arguments, load, make_model
from torch.nn import functional as F

from flatmin import SAM

args = arguments(__doc__)
x, y, x_test, y_test = load(args.tiny)
model = make_model()
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
for _ in range(args.epochs):
    for xb, yb in zip(x.split(64), y.split(64)):

        def closure(xb=xb, yb=yb):
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.zero_grad()
        loss = opt.step(closure)  # the first pass's loss; BatchNorm moved once
print(f"plain loop + SAM: test accuracy {accuracy(model, x_test, y_test):.3f}")
