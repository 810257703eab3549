"""Two-pass optimizers of the SAM family, wrapping any ``torch.optim.Optimizer`` class.

:class:`SAM` (with the ASAM, USAM and StableSAM forms) is the engine; :class:`GSAM`,
:class:`LookSAM` and :class:`ESAM` extend it through its hooks. The BatchNorm helpers
keep running statistics to the first pass of a step.
"""

from flatmin.optim.bn import disable_running_stats, enable_running_stats, running_stats_frozen
from flatmin.optim.esam import ESAM
from flatmin.optim.gsam import GSAM
from flatmin.optim.looksam import LookSAM
from flatmin.optim.presets import ASAM, StableSAM
from flatmin.optim.sam import SAM

__all__ = [
    "ASAM",
    "ESAM",
    "GSAM",
    "SAM",
    "LookSAM",
    "StableSAM",
    "disable_running_stats",
    "enable_running_stats",
    "running_stats_frozen",
]
