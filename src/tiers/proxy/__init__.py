"""The reverse proxy and L7 load balancer in front of the app servers.

    http1      sans-I/O HTTP/1.1 codec (request and response parsers, limits, checks)
    forward    what is sent on: request heads for backends, response heads for clients
    balancer   health transitions, round-robin choice, idle-pool bookkeeping (no I/O)
    upstream   backend connections, pools and active health checks (asyncio)
    server     client connections, forwarding, retries, graceful stop (asyncio)
    settings   the frozen settings the process runs with
    accesslog  one LTSV line per request
    errors     the proxy's branch of the error tree

Run it with ``python -m tiers.proxy`` (see ``tiers.proxy.__main__``).
"""
