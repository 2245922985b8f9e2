"""What comes in: dropped files, control requests, who may act on what."""
