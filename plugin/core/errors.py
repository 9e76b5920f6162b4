"""One error type for bad user input, so every front end can show it as one line."""


class InputError(ValueError):
    """Bad input: the message names the input, the problem and the fix."""

    def __init__(self, subject: object, problem: str, fix: str) -> None:
        self.subject = str(subject)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.subject}: {problem}. {fix}")


class RasterReadError(InputError):
    """GDAL could not open or read a raster: a corrupt local file, or a remote one whose transfer
    failed. Readers over the network retry on it (by type, never by the message's words)."""


class SourceError(InputError):
    """A data source (a mirror, a server, Earth Engine) failed or refused: the fix is the network,
    the URL or the account, not the values the user typed."""
