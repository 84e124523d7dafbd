"""Benchmarks and soaks (scripts, not tests).  A package so that worker
processes can import ``benchmarks.soak_runners`` by reference."""
