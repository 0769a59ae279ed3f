# The two commands of the README. Both set everything up themselves (idempotent).
.PHONY: setup demo test lint mutation

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/cbp demo

test: setup
	.venv/bin/ruff check cbp tests benchmarks
	.venv/bin/python -m pytest -q

# Mutation testing of the core modules (mutmut; ~15 min on 2 cores). Not part of `make test`.
mutation: setup
	.venv/bin/python -c "import mutmut" 2>/dev/null || .venv/bin/pip install -q -c constraints.txt -e ".[mutation]"
	bash scripts/mutation.sh
