"""PLE- and KV-sharing-aware layer stacker for depth-upscaling decoder LLMs (Gemma-4 first)."""

__version__ = "0.1.0"
