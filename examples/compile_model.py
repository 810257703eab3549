"""SAM with a compiled model: compile the model, not the step (the step runs eagerly).

python examples/compile_model.py [--tiny]
"""

import torch
from digits import accuracy, arguments, load, make_model
from torch.nn import functional as F

from flatmin import SAM

args = arguments(__doc__)
x, y, x_test, y_test = load(args.tiny)
model = make_model()
compiled = torch.compile(model, backend="aot_eager" if args.tiny else "inductor")
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
for _ in range(args.epochs):
    for xb, yb in zip(x.split(64), y.split(64)):
        opt.zero_grad()
        opt.step(
            lambda xb=xb, yb=yb: (loss := F.cross_entropy(compiled(xb), yb)).backward() or loss
        )
print(f"compiled model + SAM: test accuracy {accuracy(model, x_test, y_test):.3f}")
