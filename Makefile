# The two commands of the README:  `make up`  and  `make test`.
VENV ?= .venv

.PHONY: up test setup proto lint

up:
	scripts/setup.sh
	$(VENV)/bin/draftflow up

test:
	scripts/setup.sh --test
	$(VENV)/bin/python -m pytest -q

proto:
	$(VENV)/bin/python scripts/gen_proto.py

lint:
	$(VENV)/bin/ruff check .
