"""Everything that runs in an engine pod, imported as `loraplex.engine`.

One subpackage per layer; imports run one way (a test enforces it):
  api (HTTP: FastAPI routes, auth, metrics, the CLI)
    -> core (scheduler, block manager, model runner, sampler, adapter cache)
      -> model (the PyTorch model with LoRA hooks)
        -> loraplex.kernels (Triton kernels and their torch references)
"""
