"""The data error shared by the readers, the row schemas and the prompt and example builders."""


class DataError(ValueError):
    """A bad dataset row or file: names the file, the row (and column) and what is wrong."""
