"""lmserve on Ray Serve: replicas of the whole server, each one engine on its own device(s), behind an ingress
that sends each request to the replica holding its prompt's prefix and its LoRA adapter (router.py).

python -m server.ray_serve --num-replicas N [every python -m server flag], or
serve run server.ray_serve.app:build_app model=... num_replicas=N (app.py).
"""
