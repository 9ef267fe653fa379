"""The public gRPC API definition and the one script that generates its Python stubs."""
