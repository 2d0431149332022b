"""The tool environment's code; ``tools.py`` also runs on its own inside sandboxes."""
