"""Errors that reach users. Each message says which input is wrong, what is allowed and what to do."""


class KandinskyError(Exception):
    """Base class: an expected, user-facing failure (bad input, wrong file, missing weights)."""


class InputError(KandinskyError, ValueError):
    """An argument or node input has a value that cannot work (size, frame count, variant name...)."""


class WeightsError(KandinskyError):
    """A weights file or folder is missing, truncated, or is not what the caller asked for."""


class TruncatedFileError(WeightsError):
    """A safetensors file whose header announces more data than the file holds (an interrupted download)."""


class MissingFilesError(WeightsError, FileNotFoundError):
    """Files needed for a run are not on disk (and cannot be downloaded now)."""


class OutputError(KandinskyError):
    """A finished result could not be written where asked (the message says where it was kept instead)."""
