"""The zoo's exceptions: each says what went wrong and what to do about it.

They subclass the closest builtin too, so callers who catch `ValueError` / `LookupError` /
`OSError` keep working.
"""


class ZooError(Exception):
    """Base class of every error the zoo raises on purpose."""


class InvalidNameError(ZooError, ValueError):
    """A model name, version or label that the zoo refuses (it would be unsafe as a path)."""


class NotFoundError(ZooError, LookupError):
    """No such model, version or label in the store."""


class ChecksumError(ZooError):
    """A file does not match the sha256 the index recorded: corrupted or tampered with."""


class StoreUnreachableError(ZooError, OSError):
    """A remote store (http(s) or a tf.io.gfile URI) could not be read."""


class ReadOnlyStoreError(ZooError):
    """Writing (publish, rm) to a store that can only be read, such as an http(s) store."""


class IndexFormatError(ZooError):
    """index.json is not a zoo index this version understands."""


class LockTimeoutError(ZooError, TimeoutError):
    """Another publisher held the store's index lock for too long."""


class ArtifactError(ZooError, ValueError):
    """An encoder or run directory that cannot become a valid zoo artifact."""
