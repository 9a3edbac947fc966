"""The OpenAI-compatible HTTP server: `engine` (request queue + batched generation), `api` (FastAPI routes,
limits, errors), `web` (the chat page served at `/` with `--ui`)."""
