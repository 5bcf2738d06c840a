"""Session-wide test settings: CPU only, and one compilation cache for the whole run so that
LLM instances of the same shapes compile once."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The runner's launcher thread is a GPU default; the tests run the GPU's code path.
os.environ.setdefault("JAXPAGED_LAUNCH_THREAD", "1")
os.environ.setdefault("JAXPAGED_COMPILATION_CACHE", tempfile.mkdtemp(prefix="jaxpaged-test-xla-"))
# The tests build many engines; a frozen heap would keep every finished one's cycles alive.
os.environ.setdefault("JAXPAGED_GC_FREEZE", "0")
