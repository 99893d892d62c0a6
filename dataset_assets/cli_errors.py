"""What every ``dataset`` command shares when it fails: exit codes, and ``Failure`` (one line, our
exit code) made from the project's typed errors. Its own module so that the command modules
import it without importing one another."""

import click

from .core.errors import (
    BadDestinationError,
    DatasetError,
    FilterError,
    IncompleteDownloadError,
    LayoutError,
    ManifestError,
    OptionError,
    UnknownCollectionError,
    UnknownIndexError,
    UnsafeValueError,
)

EXIT_INCOMPLETE, EXIT_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 1, 2, 3, 130


class Failure(click.ClickException):
    """A one-line error with our exit code (click prints ``Error: message``, no traceback)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure_of(exc: DatasetError) -> Failure:
    bad_input = (
        FilterError,
        LayoutError,
        UnknownCollectionError,
        UnknownIndexError,
        BadDestinationError,
        UnsafeValueError,
        OptionError,
        ManifestError,
    )
    if isinstance(exc, bad_input):
        return Failure(str(exc), EXIT_INPUT)
    if isinstance(exc, IncompleteDownloadError):
        return Failure(str(exc), EXIT_INCOMPLETE)
    return Failure(str(exc), EXIT_ENVIRONMENT)
