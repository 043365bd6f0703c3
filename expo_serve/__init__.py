"""expo-serve: serve ExPO-extrapolated LLMs live, with α chosen per request."""
__version__ = "0.1.0"
