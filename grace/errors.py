"""The one exception users see when a checkpoint cannot be used."""


class GraceLoadError(RuntimeError):
    """A checkpoint could not be found, downloaded, recognised or read. The message says why and what to do."""
