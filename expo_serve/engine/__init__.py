"""The serving engine: continuous batching with α chosen per request."""
