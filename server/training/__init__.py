"""P-Tuning v2 training on the serving backbone: a prefix (optionally MLP-reparameterised) and a head
(classification), a prefix alone (embeddings, contrastive) or a causal-LM prefix, trained through the same prefixed
forward the server runs (``ptserve.server.engine.encoder_forward``), saved as ptserve blob and PEFT folder.
``ptserve train`` (``server/training/cli.py``) is the command line."""
