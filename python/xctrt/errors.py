"""One exception type for every problem a user can fix; the CLI prints its message as one line."""


class XctrtError(Exception):
    """A clear, one-sentence problem with the input, the model package or the output."""
