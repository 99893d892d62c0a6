"""Errors the core raises. Each message names the bad value and what would be valid."""


class DatasetError(Exception):
    """Base class for every error this project raises on purpose."""


class IndexUnavailableError(DatasetError):
    """An index file is missing, unreadable or not the expected schema."""


class UnknownCollectionError(DatasetError):
    """A collection id that the installed index does not have."""


class UnknownIndexError(DatasetError):
    """An index name that idc-index-data does not describe."""


class FilterError(DatasetError):
    """An unknown filter field, or a filter value that matches nothing."""


class EmptySelectionError(FilterError):
    """Filters that leave no series of a collection (each value may exist, but not together)."""


class ManifestError(DatasetError):
    """A manifest file that cannot be used as it is (unreadable, a column missing or of another type, empty)."""


class OptionError(DatasetError):
    """A setting or option with a value that cannot work (an endpoint that is not a bare URL, a NaN timeout)."""


class LayoutError(DatasetError):
    """A malformed layout template, or rendered paths that are unsafe or too long."""


class DownloadError(DatasetError):
    """A download that could not start, or that finished with the disk not matching the manifest."""


class VerifyError(DatasetError):
    """A check that could not run to its end (not a finding: findings go in its report)."""


class UnsafeValueError(DatasetError):
    """A value from outside (index row, manifest, server answer) that would escape the download
    root or reach a command line; the message names it."""


class BadDestinationError(DownloadError):
    """A download root that cannot be used as given (a line break or wildcard in it, a dangling
    link): bad input, not a failing environment."""


class TransferStoppedError(DownloadError):
    """The transfer was stopped on purpose: the endpoint stalled or only failed, or the disk filled.
    ``result`` holds what the disk has afterwards."""

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


class IncompleteDownloadError(DownloadError):
    """The transfer ran to its end but series are still incomplete; ``result`` says which."""

    def __init__(self, message: str, result) -> None:
        super().__init__(message)
        self.result = result
