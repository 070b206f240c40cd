# Set-up and everyday commands. `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-train-dev
PACKAGES := imgtxt image_encoder_service text_encoder_service store indexer search search_service evaluation demo trainer
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m slow"`.
PYTEST_ARGS ?=
# Extra `imgtxt demo` arguments, e.g. `make demo DEMO_ARGS="--limit 200"`.
DEMO_ARGS ?=

.PHONY: install demo test lint format protos containers test-containers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imgtxt demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(PACKAGES)

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: $(STAMP)
	$(BIN)/python -m imgtxt.protogen

# The three service images (localhost/imgtxt-{image-encoder,text-encoder,search}:VERSION); needs root, podman,
# mmdebstrap and runc (docs/deployment.md, "Local containers").
containers:
	deploy/containers/build.sh

# Builds them and runs them as containers against the in-process encoders (slow; .ci/run runs it).
test-containers: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/deploy/test_containers.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
