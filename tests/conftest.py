"""Session-wide test settings: CPU only, and one compilation cache for the whole run so that
LLM instances of the same shapes compile once."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXPAGED_COMPILATION_CACHE", tempfile.mkdtemp(prefix="jaxpaged-test-xla-"))
