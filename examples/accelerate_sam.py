"""accelerate: prepare, then one SAM step per batch; gradient accumulation inside the
closure (two micro-batches per step here).

    python examples/accelerate_sam.py [--tiny]
"""

import torch
from accelerate import Accelerator
from digits import accuracy, arguments, load, make_model
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatmin import SAM
from flatmin.integrations.accelerate import sam_step

args = arguments(__doc__)
x, y, x_test, y_test = load(args.tiny)
accelerator = Accelerator(cpu=True)  # gradient_accumulation_steps stays 1
model = make_model()
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
model, opt, loader = accelerator.prepare(model, opt, loader)
micro = 2
for _ in range(args.epochs):
    for xb, yb in loader:

        def closure(xb=xb, yb=yb):
            total = 0.0
            for j, (xm, ym) in enumerate(zip(xb.chunk(micro), yb.chunk(micro))):
                last = j == micro - 1
                with torch.enable_grad() if last else accelerator.no_sync(model):
                    loss = F.cross_entropy(model(xm), ym) / micro
                    accelerator.backward(loss)
                total += loss.detach()
            return total

        opt.zero_grad()
        sam_step(accelerator, opt, closure)
print(f"accelerate + SAM: test accuracy {accuracy(model, x_test, y_test):.3f}")
