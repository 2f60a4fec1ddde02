"""The demo experiment's inputs: real text from PyPI packages, split into fixed train / held-out sets."""
