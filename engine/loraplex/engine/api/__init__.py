"""The engine's HTTP layer: OpenAI, LoRAX and adapter-admin routes, health, metrics, auth.

Imports go one way: api -> core -> model -> kernels. `create_app` builds the FastAPI app
around an `AsyncEngine` (or a factory that builds one while /health already answers);
`loraplex-engine` (cli.main) parses the flags and runs it under uvicorn.
"""
