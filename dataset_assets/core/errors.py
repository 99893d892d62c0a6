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


class LayoutError(DatasetError):
    """A malformed layout template, or rendered paths that are unsafe or too long."""


class DownloadError(DatasetError):
    """A download that could not start, or that finished with the disk not matching the manifest."""


class VerifyError(DatasetError):
    """A check that could not run to its end (not a finding: findings go in its report)."""
