"""Benchmarks: Control Tower vs LangGraph on the same workloads (see bench/README.md)."""
