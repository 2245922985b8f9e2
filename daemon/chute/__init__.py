"""chute: a spool-directory job daemon for bare-metal Linux servers."""

__version__ = "0.1.0"
