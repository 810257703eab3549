"""Lightning: SAM from configure_optimizers (automatic optimization) and SAF, driven and
checkpointed by flatmin's callback.

    python examples/lightning_sam.py [--tiny]
"""

import pytorch_lightning as pl
import torch
from digits import accuracy, arguments, load, make_model
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from flatmin import SAF, SAM
from flatmin.integrations.lightning import FlatminCallback


class DigitsModule(pl.LightningModule):
    def __init__(self, num_samples: int):
        super().__init__()
        self.net = make_model()
        self.saf = SAF(num_samples, num_classes=10, lag_epochs=1, start_epoch=0)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y) + self.saf(logits, idx)
        if not self.optimizers().is_perturbed:  # log the first pass (at w) only
            self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):  # model=: Lightning's optimizer_step cannot pass it
        return SAM(self.net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
                   model=self.net)  # fmt: skip


args = arguments(__doc__)
x, y, x_test, y_test = load(args.tiny)
loader = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=64, shuffle=True)
module = DigitsModule(len(x))
trainer = pl.Trainer(
    max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[FlatminCallback()],
)  # fmt: skip
trainer.fit(module, loader)
print(f"Lightning + SAM + SAF: test accuracy {accuracy(module.net, x_test, y_test):.3f}")
