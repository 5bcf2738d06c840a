#!/usr/bin/env bash
# Install jaxpaged and generate text with the bundled SmolLM2-135M-Instruct.
source "$(dirname "$0")/_setup.sh"
setup_venv ""
exec .venv/bin/jaxpaged generate --chat --max-tokens 64 \
  --prompt "${1:-What is the capital of France? Answer in one sentence.}"
