"""The durable store: atomic writes, the spool and run folder layouts, retention."""
