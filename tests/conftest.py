"""Property tests draw the same examples on every run: the suite passes or fails the same way each time."""

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.load_profile("repeatable")
