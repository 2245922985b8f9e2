"""Trivial callables for bench_engine.py (importable by chute's workers and by the floor)."""


def inc(x: int) -> int:
    return x + 1


def inc_kw(x: int) -> dict[str, int]:
    return {"y": x + 1}
