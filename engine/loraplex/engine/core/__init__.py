"""The inference engine: scheduler, block manager, model runner, sampler, adapter manager.

In-process API: `LLMEngine` (synchronous, one thread) and `AsyncEngine` (a step loop on a
background thread, used by the HTTP layer).
"""
