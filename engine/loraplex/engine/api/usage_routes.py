"""GET /v1/usage: a tenant's token and request totals since the process started (usage.py).

With an API key: the key's tenant only. With the admin token: every tenant. Without a keys file:
the caller's tenant (`default`, or the one an inference gateway names). Keys on and no key: 401.
The totals are this process's, not the deployment's: sum over pods, or use the Prometheus
counters (`loraplex_tenant_*`) or the usage log for a durable record.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from loraplex.engine.api.state import get_state

router = APIRouter()


@router.get("/v1/usage")
async def usage(request: Request):
    state = get_state(request)
    principal = state.auth.inference(request)  # 401 / 400 as for inference routes
    meter = state.usage
    data = meter.usage_all() if principal.is_admin else [meter.usage(principal.tenant)]
    return {"object": "usage", "since": int(meter.since), "data": data}
