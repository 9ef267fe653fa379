"""HTTP frontend (starlette): translates requests to engine.generate() calls and back."""
