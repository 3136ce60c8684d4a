"""The OpenAI-compatible API: request models, the completion and chat routes, and what they share."""
