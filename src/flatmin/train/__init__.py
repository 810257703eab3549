"""The reference trainer: datasets, models, the method registry and the training loop.

* :mod:`flatmin.train.data` and :mod:`flatmin.train.models` — what to train on and what.
* :mod:`flatmin.train.registry` — method name → hyperparameters (paper defaults) and a
  factory for the optimizer, update rule and loss terms a step needs.
* :mod:`flatmin.train.loop` — :class:`~flatmin.train.loop.Trainer`, which runs any
  registered method, evaluates every epoch and resumes bit-exactly from its checkpoint.
* :mod:`flatmin.train.checkpoint` — the run directory's files, written atomically.
* :mod:`flatmin.train.command` — the ``flatmin train`` command.

Nothing is imported here, so ``import flatmin.train.data`` stays as cheap as it can be.
"""
