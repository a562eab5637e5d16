"""The project's scripts, one importable package: run each from the repository root as ``python -m scripts.<name>``
(the benchmarks as ``python -m scripts.bench.<name>``); they import each other as ``scripts.<name>``."""
