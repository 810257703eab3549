"""timm: build SAM around timm's SGD through its optimizer factory.

    python examples/timm_registry.py [--tiny]

timm imports torchvision, which must be built for your torch.
"""

import timm.optim
from digits import accuracy, arguments, load, make_model
from torch.nn import functional as F

from flatmin.integrations.timm import register_timm_optimizers

args = arguments(__doc__)
x, y, x_test, y_test = load(args.tiny)
model = make_model()
register_timm_optimizers()  # "samsgd", "samadamw", "gsamsgd", …
opt = timm.optim.create_optimizer_v2(
    model, "samsgd", lr=0.1, weight_decay=5e-4, rho=0.05, model=model
)
for _ in range(args.epochs):
    for xb, yb in zip(x.split(64), y.split(64)):
        opt.zero_grad()
        opt.step(lambda xb=xb, yb=yb: (loss := F.cross_entropy(model(xb), yb)).backward() or loss)
print(f"timm factory + SAM: test accuracy {accuracy(model, x_test, y_test):.3f}")
