# The two commands of the README. Both set everything up themselves (idempotent).
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/cbp demo

test: setup
	.venv/bin/ruff check cbp tests benchmarks
	.venv/bin/python -m pytest -q
