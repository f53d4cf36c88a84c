# `make flash BOARD=<profile> TARGET=<user@host | mounted root>` (included by the top-level Makefile).
# Profiles: hw/boards/*.toml. FLASH_ARGS may add --dry-run, --force, --wheels DIR, --no-venv or --ssh CMD.
FLASH_PY := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)

flash:
	@if [ -z "$(BOARD)" ] || [ -z "$(TARGET)" ]; then \
		echo "usage: make flash BOARD=<profile> TARGET=<user@host | mounted root> [FLASH_ARGS=--dry-run]"; \
		echo "profiles: $$(ls hw/boards | sed 's/\.toml$$//' | tr '\n' ' ')"; exit 2; fi
	$(FLASH_PY) hw/flash/flash.py --board "$(BOARD)" --target "$(TARGET)" $(FLASH_ARGS)
