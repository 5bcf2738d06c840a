"""jaxpaged: a JAX/XLA LLM inference and serving engine with paged attention.

`from jaxpaged import LLM, SamplingParams`. LLM is imported lazily so that importing the
pure-Python engine modules never pulls in jax.
"""

from jaxpaged.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from jaxpaged.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxpaged' has no attribute {name!r}")
