"""Per-token VFD risks and intervention flags over HTTP: a `vllm.endpoint_plugins` route for `vllm serve`.

vLLM 0.32 carries no per-request extra data from the model runner to an OpenAI response (the only
free-form field, `kv_transfer_params`, belongs to KV connectors), so the records stay in the engine
and this route hands them out: `POST /v1/vfd_records {"id": "<completion id>"}` after the completion
returned. It is vLLM's documented pairing: the engine-side method (`ValueSteerWorker.vsteer_take_records`)
plus an endpoint plugin that reaches it through `EngineClient.collective_rpc`. Endpoint plugins load
only when named in `VLLM_PLUGINS` (e.g. `VLLM_PLUGINS=vsteer_hf,vsteer_vfd_records`).
"""

# No `from __future__ import annotations`: FastAPI reads the route's `Request` annotation as a live class.
from argparse import Namespace
from typing import Any

RECORDS_ROUTE = "/v1/vfd_records"
PLUGIN_NAME = "vsteer_vfd_records"


def choices_from_records(completion_id: str, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Records keyed by engine request id (`<completion id>-<prompt index>-<suffix>`) as per-choice dicts."""
    choices = []
    for engine_id, record in records.items():
        rest = engine_id[len(completion_id) + 1 :] if engine_id.startswith(f"{completion_id}-") else ""
        index = rest.split("-", 1)[0]
        if not index.isdigit():
            continue
        choices.append({"index": int(index), "value_scores": record["value_scores"],
                        "interventions": record["interventions"]})
    return sorted(choices, key=lambda choice: choice["index"])


class VFDRecordsEndpoint:
    """`POST /v1/vfd_records`: the per-token `value_scores` and `interventions` of a finished completion, once."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, HTTPException, Request

        router = APIRouter()

        @router.post(RECORDS_ROUTE)
        async def vfd_records(raw_request: Request) -> dict[str, Any]:
            body = await raw_request.json()
            completion_id = body.get("id") if isinstance(body, dict) else None
            if not isinstance(completion_id, str) or not completion_id:
                raise HTTPException(400, detail='send {"id": "<the completion\'s id>"}, e.g. {"id": "cmpl-..."}.')
            client = raw_request.app.state.engine_client
            records = (await client.collective_rpc("vsteer_take_records", kwargs={"request_id": completion_id}))[0]
            choices = choices_from_records(completion_id, records)
            if not choices:
                raise HTTPException(
                    404,
                    detail=f"no VFD records for {completion_id!r}: the id is unknown, its records were taken already, "
                    "or the server was not started with --worker-cls vsteer_hf.vllm.worker.ValueSteerWorker.",
                )
            return {"id": completion_id, "choices": choices}

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        pass
