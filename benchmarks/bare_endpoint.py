"""The serving ceiling: a bare Starlette `/invocations` that reads the body and returns a fixed
one-prediction answer, under uvicorn as our model server runs (one worker, h11), no model.

bench_serving loads it beside our server: our requests/s as a share of this one's is what the
request path (admission, parsing, batching, the model) costs over the framework alone.

Usage: python -m benchmarks.bare_endpoint PORT
"""

from __future__ import annotations

import json
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ANSWER = json.dumps({"predictions": [{"text": "ABCDE", "confidence": 0.9}]})


async def invocations(request: Request) -> Response:
    """Read the body, answer the same JSON shape our server answers."""
    await request.body()
    return Response(ANSWER, media_type="application/json", headers={"X-Model-Version": "0"})


async def ping(request: Request) -> Response:
    """Health check for the benchmark's start-up wait."""
    return Response("ok")


def main(port: int) -> None:
    """Serve the bare endpoint on 127.0.0.1:`port` until stopped."""
    import uvicorn

    app = Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, access_log=False, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]))
