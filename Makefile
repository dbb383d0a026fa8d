# evaclip: two commands on a fresh machine:  make setup  then  make demo  (and make test)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# DeepSpeed JIT-builds its CPU ops (shm comm) on first use: keep them inside the venv
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

DEMO_DATA := data/synth
DEMO_RUN  := runs/demo_cpu

FLYWHEEL_SEEDS ?= 0 1 2

.PHONY: setup demo flywheel distill coca capfilt test test-cluster test-fast bench lint lock clean help

help:
	@echo "make setup      create .venv and install the pinned stack (CPU torch) + evaclip"
	@echo "make demo       synth data -> train -> zero-shot eval -> open_clip export (+ reload check)"
	@echo "make flywheel   CLIP teacher -> MIM student -> CLIP from it vs from scratch (runs/flywheel/summary.json)"
	@echo "make distill    a smaller student distilled from the demo CLIP vs from scratch, 3 seeds (runs/distill/summary.md)"
	@echo "make coca       the CoCa demo vs the CLIP demo, 3 seeds: held-out captions and zero-shot top-1 (runs/coca/summary.md)"
	@echo "make capfilt    CapFilt on 4 demo shards with 30% of captions moved; CLIP on noisy vs cleaned vs untouched, 3 seeds (runs/capfilt/summary.md)"
	@echo "make test       the whole test suite (CPU; includes slow end-to-end and 2-process tests)"
	@echo "make test-cluster  the cluster tier: a real two-node Slurm on this machine (root), sbatch / requeue / torchrun"
	@echo "make test-fast  tests without the slow end-to-end ones"
	@echo "make bench      benchmarks, results in bench/results/"
	@echo "make lint       ruff and the import-linter layering contract (pyproject.toml)"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/lock.txt requirements/constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-deps -c requirements/constraints.txt -r requirements/lock.txt
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "from evaclip._shim import write_pth; print('import hooks:', write_pth())"
	$(BIN)/pip check
	@touch $@

demo: setup
	$(BIN)/evaclip data synth --out $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(BIN)/evaclip train demo_cpu run.output_dir=runs run.name=demo_cpu data.root=$(DEMO_DATA)
	$(BIN)/evaclip eval --checkpoint $(DEMO_RUN) --suite quick \
		--datasets-root $(DEMO_DATA)/zeroshot --out $(DEMO_RUN)/zeroshot --require-acc1 0.09375
	$(BIN)/evaclip export $(DEMO_RUN) --out $(DEMO_RUN)/open_clip_export --verify
	@echo ""
	@echo "demo done:"
	@echo "  data:        $(DEMO_DATA)  (train shards + zero-shot sets)"
	@echo "  run:         $(DEMO_RUN)  (config.resolved.toml, metrics.jsonl, plots.png, checkpoints/)"
	@echo "  zero-shot:   $(DEMO_RUN)/zeroshot/results.md"
	@echo "  open_clip:   $(DEMO_RUN)/open_clip_export  (open_clip.create_model_and_transforms('local-dir:...'))"

# the EVA loop on the embedded data: the demo CLIP (trained when runs/demo_cpu is missing) teaches a MIM student,
# a CLIP from that student races a CLIP from scratch, per seed; table + runs/flywheel/summary.json
flywheel: setup
	test -f $(DEMO_DATA)/recipe.toml || $(BIN)/evaclip data synth --out $(DEMO_DATA)
	$(BIN)/python -m evaclip.flywheel --data $(DEMO_DATA) --teacher $(DEMO_RUN) --out runs/flywheel \
		--seeds $(FLYWHEEL_SEEDS)

distill: setup
	test -f $(DEMO_DATA)/recipe.toml || $(BIN)/evaclip data synth --out $(DEMO_DATA)
	$(BIN)/python -m evaclip.distill_study --data $(DEMO_DATA) --teacher $(DEMO_RUN) --out runs/distill \
		--seeds 0 1 2

coca: setup
	test -f $(DEMO_DATA)/recipe.toml || $(BIN)/evaclip data synth --out $(DEMO_DATA)
	$(BIN)/python -m evaclip.coca_study --data $(DEMO_DATA) --out runs/coca --seeds 0 1 2

capfilt: setup
	test -f $(DEMO_DATA)/recipe.toml || $(BIN)/evaclip data synth --out $(DEMO_DATA)
	$(BIN)/python -m evaclip.capfilt_study --data $(DEMO_DATA) --captioner runs/coca/captioner --out runs/capfilt \
		--seeds 0 1 2 --shards 4

# the 40 slowest tests are listed at the end, and every test's time is in test-results.xml (JUnit): a suite that
# grows slower shows where
test: setup
	$(BIN)/python -m pytest -q -m "not cluster" --durations=40 --junitxml=test-results.xml tests

# brings up launch/slurm/local_cluster.sh (apt + daemons, as root) for the session and takes it down after
test-cluster: setup
	$(BIN)/python -m pytest -q -m cluster tests/cluster

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: setup
	$(BIN)/python bench/run.py --out bench/results

lint: setup
	$(BIN)/ruff check evaclip tests bench
	$(BIN)/lint-imports --no-cache

lock:
	$(BIN)/pip freeze --all | grep -v -iE "^(evaclip|-e |pip==)" > requirements/lock.body
	{ sed -n '1,3p' requirements/lock.txt; cat requirements/lock.body; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt && rm requirements/lock.body

clean:
	rm -rf runs results exports data/synth .pytest_cache
