"""vlm-chat core: image -> pixel_values -> vision features -> projector -> LLM embeddings -> text."""
