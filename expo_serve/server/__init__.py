"""The OpenAI-compatible HTTP server (DESIGN.md §6): create_app() on an AsyncEngine, α per request.

A request travels: routes -> chat | completions -> serving (model, α via alpha.AlphaPolicy,
admission) -> generation (one engine request per prompt and α) -> the engine; back out through
logprobs/protocol, whole or as server-sent events (streaming).
"""
