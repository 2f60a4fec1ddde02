"""What the stages share, so that no stage imports another for a helper: output folders (outputs), file formats
(files), checkpoint folders (checkpoint), TRL datasets (data), token rules (tokens), the chunked LM head (logits),
model-card text (cards), and the command line and logging of every entry point (cli). See docs/architecture.md,
"The shared core (`core/`)"."""
