"""What the tests and the benchmarks share: real processes on loopback or on network
namespaces, the one reader of a streamed chat completion, and the scenarios both run.

Its own package, beside ``tests/`` and ``bench/``, so that a benchmark imports neither
the test modules nor pytest: nothing here imports pytest (the fixtures built on it stay
in ``tests/conftest.py``). Not part of the installed product (pyproject.toml names the
product's packages one by one); it runs from a checkout of the repository.
"""
