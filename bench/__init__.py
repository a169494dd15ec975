"""Benchmarks: queenbee + workerbee against llama-cpp-python on the bundled model, and the queen alone.

`python -m bench` (or `python bench/run.py`) runs the suite, prints the table and writes
docs/benchmarks.md. See run.py for what is measured and how.
"""
