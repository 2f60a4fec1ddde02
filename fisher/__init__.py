"""Diagonal Fisher importance of the source model on instruction data (`make fisher`)."""
