"""transformers: FlatminTrainer with SAM and MESA on a model built locally (nothing is
downloaded): the digits network behind a transformers-style forward.

    python examples/transformers_trainer.py [--tiny]
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from digits import accuracy, arguments, load, make_model
from torch import nn
from torch.nn import functional as F
from transformers import TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from flatmin import MESA, SAM
from flatmin.integrations.transformers import FlatminTrainer, LogitsOf


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, pixels, labels=None):
        logits = self.net(pixels)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


args = arguments(__doc__)
x, y, x_test, y_test = load(args.tiny)
data = [{"pixels": xi, "labels": yi} for xi, yi in zip(x, y)]
model = DigitsClassifier()
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
mesa = MESA(LogitsOf(model), decay=0.99, start_epoch=0)
with tempfile.TemporaryDirectory() as out:
    training = TrainingArguments(
        output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=64,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, lr_scheduler_type="constant", max_grad_norm=1.0,
    )  # fmt: skip
    FlatminTrainer(
        model=model, args=training, train_dataset=data, optimizers=(opt, None), mesa=mesa
    ).train()
print(f"transformers Trainer + SAM + MESA: test accuracy {accuracy(model.net, x_test, y_test):.3f}")
