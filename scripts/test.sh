#!/usr/bin/env bash
# Install jaxpaged with its test dependencies and run the whole test suite on CPU.
source "$(dirname "$0")/_setup.sh"
setup_venv "test"
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
