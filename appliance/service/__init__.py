"""``streamchat serve``: the chat pipeline behind a local HTTP API (WebSocket chat, OpenAI-compatible endpoints,
health and Prometheus metrics) on FastAPI + uvicorn.

Only ``streamchat serve`` imports this package, so the runtime core and the other commands work without the
``service`` extra (fastapi, uvicorn, prometheus-client).
"""
