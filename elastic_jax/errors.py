"""Error types shared by the config modules (``config``, ``elastic_config``).

They live here, below both, so the config modules import in one direction only:
``config`` -> ``elastic_config`` -> ``errors``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config.json field is missing or has a value we cannot run."""
