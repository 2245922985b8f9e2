"""The engine: a run's DAG (dag), retry delays (retry), the stage cache (cache), and the loop
that drives runs through an executor and the allocator (loop)."""
