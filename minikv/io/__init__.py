"""Loading checkpoints and tokenizers, and converting the default model: the way weights come in."""
