"""LoRA heal of a raw stack with Fisher-subspace protection (`accelerate launch heal/train.py`)."""
