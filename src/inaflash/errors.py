"""User-facing errors: the CLI prints these as one line, without a traceback."""


class InaflashError(Exception):
    """Bad input or an unmeetable request; the message names the cause."""


class StoreError(InaflashError):
    """A flash store is missing, incomplete, truncated or of another format version."""


class UnsupportedModelError(InaflashError):
    """The source model's architecture (or one of its options) is not implemented."""


class CorruptStoreError(StoreError):
    """Data read from a store does not match its checksums: the store is damaged (the message names file and bytes)."""


class BudgetError(InaflashError):
    """A memory budget below what the request needs (the message names the minimum and its parts)."""
