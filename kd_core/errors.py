"""Errors a user can act on. The CLI prints their message alone (no traceback) and exits non-zero."""


class KDCacheError(Exception):
    """Base of every error whose message tells the user what to do."""


class ConfigError(KDCacheError):
    """A config value or input is wrong: the message names the key and the fix. Nothing was written."""


class StorageError(KDCacheError):
    """The cache would not fit (output.max_bytes or free space), or a target cannot be written."""


class CacheFileError(KDCacheError):
    """A cache or shard file is missing, truncated or fails verification."""


class AlreadyPublished(KDCacheError):
    """Another run published this version while this one was running: there is nothing left to do."""
