"""c2w: Context-to-Weight Consolidation.

Frozen backbone -> writable adapters -> write gate -> sleep consolidation -> continual-learning
evaluation. See README.md for the map of the package.
"""

__version__ = "0.1.0"

import warnings as _warnings

# peft (0.21) calls a transformers 5 method that transformers marks deprecated; the warning is
# theirs, not actionable here, and it prints once per adapter we create.
_warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
