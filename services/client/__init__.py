"""The Python client of the public gRPC API (`sdk`) and the `minicpmo chat` / `minicpmo session` commands (`cli`)."""
