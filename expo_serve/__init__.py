"""expo-serve: serve ExPO-extrapolated LLMs live, with α chosen per request."""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "sweep", "__version__"]


def __getattr__(name):
    # Imported on first use, so `expo-serve --help` does not pay for torch and transformers.
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .engine.request import SamplingParams

        return SamplingParams
    if name == "sweep":
        # The code lives in alpha_sweep/: a subpackage named `sweep` would replace this function
        # with itself as soon as it was imported.
        from .alpha_sweep import sweep

        return sweep
    raise AttributeError(f"module 'expo_serve' has no attribute {name!r}")
