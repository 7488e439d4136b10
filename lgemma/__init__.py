"""lgemma: LLaVA-Gemma, small enough to learn from.

The pipeline, one module each: data -> vision -> connector -> language -> model ->
training -> evaluation; `pipeline` chains them with caching, `cli` exposes them.
"""
__version__ = "0.1.0"
