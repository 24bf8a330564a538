"""The stock Atropos API, atroposlib's own ``atroposlib.api:app`` unchanged, without a line per request.

atroposlib's ``run-api`` serves the same app with uvicorn's access log on: every environment poll
(``/status-env``, ten a second per environment), every posted group and every ``/batch`` poll is a
line, tens of thousands an hour. Local runs start the API with this module instead; pass
``--access-log`` to see every request again.

    python -m atropos_megatron.launch.atropos_api --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atropos_megatron.launch.atropos_api", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--access-log", action="store_true", help="log every request, as run-api does")
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run("atroposlib.api:app", host=args.host, port=args.port, access_log=args.access_log)


if __name__ == "__main__":
    main()
