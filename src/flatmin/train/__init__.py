"""The reference trainer: datasets, models, the method registry and the training loop.

* :mod:`flatmin.train.data` and :mod:`flatmin.train.models` — what to train on and what.
* :mod:`flatmin.train.method` — what a training step drives: an optimizer, an update
  rule (one pass or the SAM family's two) and loss terms (SAF, MESA);
  :mod:`flatmin.train.spec` — hyperparameters with paper defaults and method specs;
  :mod:`flatmin.train.registry` — the registered methods, one ``register`` call each.
* :mod:`flatmin.train.config` — :class:`~flatmin.train.config.TrainConfig`, the checked
  settings of a run, and its learning-rate schedule.
* :mod:`flatmin.train.loop` — :class:`~flatmin.train.loop.Trainer`, which runs any
  registered method, evaluates every epoch and resumes bit-exactly from its checkpoint;
  :mod:`flatmin.train.ddp` — the same on N processes under DDP.
* :mod:`flatmin.train.checkpoint` — the run directory's files (written atomically, the
  checkpoint with a checksum) and :func:`~flatmin.train.checkpoint.load_run`;
  :mod:`flatmin.train.lock` — the run directory's lock.

Nothing is imported here, so ``import flatmin.train.data`` stays as cheap as it can be.
"""
