# The two commands a new user needs:  make serve   and   make test
# Benchmarks refuse a checkout with uncommitted changes; ARGS=--allow-dirty runs (and records) one anyway.
.PHONY: install serve test test-fast bench bench-demo bench-stock bench-train-memory quality

install:
	bash scripts/install.sh

serve: install
	.venv/bin/vllm-tokenprune serve $(MODEL) $(ARGS)

test: install
	.venv/bin/python -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	.venv/bin/python -m pytest -ra -m "not server and not vllm" $(PYTEST_ARGS)

bench: install
	bash benchmarks/run_cpu.sh $(ARGS)

# What `make serve` gives one client: TTFT per keep ratio, learned and learned_query, auto included.
bench-demo: install
	.venv/bin/vllm-tokenprune bench --paired-methods learned,learned_query --ratios 1.0,0.5,0.25,0.1,auto \
		--paired-images clutter --paired-rounds 60 --methods learned --concurrency 1,4 \
		--out benchmarks/results/demo-ttft $(ARGS)

bench-stock: install
	bash benchmarks/against_stock.sh $(ARGS)

bench-train-memory: install
	PYTHONPATH=. .venv/bin/python benchmarks/train_memory.py --out benchmarks/results/train-memory $(ARGS)

quality: install
	bash benchmarks/quality.sh $(ARGS)
