"""The trainer's typed errors.

Every error a user can cause derives from :class:`MegamoeError`; the CLI prints
its message as one line and exits non-zero instead of showing a traceback.
"""


class MegamoeError(Exception):
    """Base of every error a user can cause (bad config, bad data, bad flags)."""


class ConfigError(MegamoeError, ValueError):
    """A config file or override is malformed or invalid; the message names the key."""


class DataError(MegamoeError):
    """A corpus or prepared token directory is missing, empty or corrupt."""


class CheckpointError(MegamoeError):
    """A checkpoint is missing, damaged, or does not fit the configured model."""


class EtcdUnavailable(MegamoeError):
    """etcd cannot be reached (refused, timed out, 5xx); the message names endpoint and action."""
