"""Errors a user can act on: each carries one clear sentence, and the CLI prints just that."""


class ExpoError(Exception):
    """A failure caused by the input or the environment, not by a bug in expo-serve."""
