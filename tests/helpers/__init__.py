"""Shared test helpers: fixtures data, gloo and worker-loop harnesses, and fault-injecting workloads."""
