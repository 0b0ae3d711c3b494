"""The one error type of bad data input: unknown sources, unusable folders, over-long records."""


class DataError(ValueError):
  """Data that cannot be used as given; the message names the source, file or record."""
