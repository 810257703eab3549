"""``python -m flatmin.cli``: the ``flatmin`` command (also under ``torchrun -m``)."""

from flatmin.cli import main

raise SystemExit(main())
