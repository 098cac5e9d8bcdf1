"""c2w: Context-to-Weight Consolidation.

Frozen backbone -> writable adapters -> write gate -> sleep consolidation -> continual-learning
evaluation. See README.md for the map of the package.
"""

__version__ = "0.1.0"
