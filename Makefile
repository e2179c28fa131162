# reflowpairs: `make demo` runs the pipeline on the bundled tiny world, `make test` runs the offline suite.
# Both create .venv on Python 3.12 (found by scripts/find-python312.sh) and install the project first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RP := $(VENV)/bin/reflowpairs
DEMO ?= demo_out
STAMP := $(VENV)/.installed

.PHONY: venv demo lint test test-fast clean gpu-check bench bench-generate bench-train bench-memory bench-store bench-exact bench-x0 bench-scale

venv: $(STAMP)

$(STAMP): pyproject.toml plugins/lerobot_env_gapworld/pyproject.toml
	@test -x $(PY) || "$$(scripts/find-python312.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet -e plugins/lerobot_env_gapworld
	@touch $(STAMP)

# dataset -> teacher -> pairs -> validate -> student -> eval, all offline on 2 CPU cores.
demo: $(STAMP)
	$(PY) examples/demo.py --out $(DEMO)

# Lint and format checks first (ruff, configured in pyproject.toml), then the offline suite.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# The fast tier, for use while working (at most 4 minutes on 2 cores): the tests not marked slow, no lint. Each is
# guarded (tests/conftest.py): one that starts a process, trains a student or runs lerobot-train/lerobot-eval fails
# with "mark it @pytest.mark.slow". `make test` still runs every test.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Benchmarks (not tests): each prints its side-by-side ratios; figures in benchmarks/RESULTS.md.
# Pass other settings with ARGS, e.g. `make bench-generate ARGS="--device cuda --ks 1,4,16"`.
bench: bench-generate bench-train bench-memory bench-store bench-exact bench-x0 bench-scale

# Default settings of each benchmark (in variables: a comma inside $(or ...) would split its arguments).
BENCH_GENERATE_ARGS := --size small --ks 1,4,16 --batch-size 32 --episodes 0,1,2,3
# pi0/pi05 (tiny offline pi teachers of a "small" size): the second line of bench-generate when ARGS is not given.
BENCH_GENERATE_PI_ARGS := --size pi0-small,pi05-small --ks 4,16 --batch-size 16 --episodes 0,1 --skip-single
# EO-1 and Multi-task DiT (issue #26; tiny untrained teachers, 10 steps): the third line when ARGS is not given.
BENCH_GENERATE_FAMILY_ARGS := --size eo1-tiny,dit-tiny --ks 4,16 --batch-size 16 --episodes 0,1 --skip-single
BENCH_TRAIN_ARGS := --size small --batch-size 16 --steps 5 --repeats 5
BENCH_MEMORY_ARGS := --size large --batch-size 8 --steps 3
BENCH_STORE_ARGS := --size small --samples-per-frame 8 --batch-size 32
BENCH_EXACT_ARGS := --size small --k 4 --episodes 0,1 --batch-size 16
BENCH_X0_ARGS := --pairs 4000 --repeats 3
BENCH_SCALE_ARGS := --sizes 10000,100000

bench-generate: $(STAMP)
	$(PY) benchmarks/bench_generate.py $(or $(ARGS),$(BENCH_GENERATE_ARGS))
	$(if $(ARGS),,$(PY) benchmarks/bench_generate.py $(BENCH_GENERATE_PI_ARGS))
	$(if $(ARGS),,$(PY) benchmarks/bench_generate.py $(BENCH_GENERATE_FAMILY_ARGS))

bench-train: $(STAMP)
	$(PY) benchmarks/bench_train.py $(or $(ARGS),$(BENCH_TRAIN_ARGS))

bench-memory: $(STAMP)
	$(PY) benchmarks/bench_memory.py $(or $(ARGS),$(BENCH_MEMORY_ARGS))

bench-store: $(STAMP)
	$(PY) benchmarks/bench_store.py $(or $(ARGS),$(BENCH_STORE_ARGS))

bench-exact: $(STAMP)
	$(PY) benchmarks/bench_exact.py $(or $(ARGS),$(BENCH_EXACT_ARGS))

bench-x0: $(STAMP)
	$(PY) benchmarks/bench_x0.py $(or $(ARGS),$(BENCH_X0_ARGS))

# pair-store costs as the store grows (issue #15); ARGS="--sizes 10000,100000,1000000" for the full curve
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py $(or $(ARGS),$(BENCH_SCALE_ARGS))

# One prepared run for a machine with one CUDA GPU (about 8 minutes): the CUDA tests, bench-generate/train/exact on CUDA
# at the small and SmolVLA-shaped sizes in float32 and bfloat16, and the tiny world through the CLI on CUDA. Logs and a
# summary.md for RESULTS.md in gpu_check_out/. Without a GPU it says so and exits 0. ARGS="--dry-run" prints the plan.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache
