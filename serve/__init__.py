"""Serving: Gradio chat UI and OpenAI-compatible API."""
