# The two commands of the README. Both set everything up themselves (idempotent).
.PHONY: setup demo demo-gpt test lint mutation

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/cbp demo

# Character-level GPT on Shakespeare: pretrain (cached in runs/gpt/pretrain), CBP to ternary
# weights, evaluate (loss, bits per character), generate 300 characters.
demo-gpt: setup
	.venv/bin/cbp pretrain --config gpt --out runs/gpt/pretrain --resume
	.venv/bin/cbp quantize --config gpt --from runs/gpt/pretrain/checkpoint.pt --out runs/gpt/ternary --overwrite
	.venv/bin/cbp evaluate runs/gpt/ternary/checkpoint.pt
	.venv/bin/cbp generate runs/gpt/ternary/checkpoint.pt --prompt "ROMEO:" --tokens 300 --seed 0

test: setup
	.venv/bin/ruff check cbp tests benchmarks
	.venv/bin/python -m pytest -q

# Mutation testing of every module but the CLI glue (mutmut; 2-4 hours on 2 cores). Not part of `make test`.
mutation: setup
	.venv/bin/python -c "import mutmut" 2>/dev/null || .venv/bin/pip install -q -c constraints.txt -e ".[mutation]"
	bash scripts/mutation.sh
