"""Scale-out: quire replicas on Ray Serve behind an OpenAI-compatible ingress.

``prefix_key`` and ``prefix_policy`` are pure Python (no Ray): the routing key of a request and
the prefix-aware choice of a replica. ``asgi_bridge`` runs quire's own FastAPI app in-process for
a forwarded request. The ``ray_*`` modules import Ray: the replica and metrics-hub deployments,
the ingress, the request-router adapter, the application builder and the CLI entry point.
"""
