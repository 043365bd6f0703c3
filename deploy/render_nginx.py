"""Fill deploy/nginx.conf's placeholders: where nginx listens and the replicas behind it.

    python deploy/render_nginx.py --listen 8000 --replica 10.0.0.11:8000 --replica 10.0.0.12:8000 \
        > /etc/nginx/conf.d/expo-serve.conf && nginx -t && nginx -s reload

Standard library only, so it runs anywhere nginx does; tests/test_replicas.py renders the same way.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf")
ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
LISTEN = re.compile(r"^((\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):)?\d{1,5}$")
# A replica that failed this many times in this window is left out for the window (passive check).
SERVER_OPTIONS = "max_fails=3 fail_timeout=10s"


def render(listen: str, replicas: list[str], template: str | None = None) -> str:
    if not LISTEN.match(listen):
        raise ValueError(f"--listen must be PORT or HOST:PORT, got {listen!r}.")
    if not replicas:
        raise ValueError("Give at least one --replica HOST:PORT.")
    for replica in replicas:
        if not ADDRESS.match(replica):
            raise ValueError(f"A replica must be HOST:PORT, got {replica!r}.")
    text = TEMPLATE.read_text() if template is None else template
    servers = "\n".join(f"    server {replica} {SERVER_OPTIONS};" for replica in replicas)
    return text.replace("{{LISTEN}}", listen).replace("{{REPLICAS}}", servers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="PORT or HOST:PORT nginx listens on")
    parser.add_argument("--replica", action="append", default=[], help="HOST:PORT of one expo-serve replica")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(render(args.listen, args.replica))
    except ValueError as exc:
        print(f"render_nginx: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
