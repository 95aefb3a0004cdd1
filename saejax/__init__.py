"""saejax: do sparse autoencoders learn the same features when only the seed changes?

Entry points: :func:`saejax.train.train` (many seeds in one compiled program),
:mod:`saejax.stability` (cross-seed metrics), ``python -m saejax.run EXPERIMENT.py``.
"""

from saejax.config import SAEConfig, TrainConfig
from saejax.data import ArraySource, SyntheticSource
from saejax.errors import ConfigError

__all__ = ["SAEConfig", "TrainConfig", "ArraySource", "SyntheticSource", "ConfigError"]
__version__ = "0.1.0"
