"""The `vlm-chat` command line: one dispatcher over the commands each layer registers."""
