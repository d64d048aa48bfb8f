"""gru-lm: character-level recurrent language models, trained and compared honestly."""

__version__ = "0.1.0"
