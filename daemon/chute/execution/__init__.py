"""Processes: the executor seam, the local backend, its tasks, workers and fences."""
