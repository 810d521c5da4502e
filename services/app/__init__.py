"""The Ray Serve application: its typed arguments (the one source of deployment defaults), the builder that
binds every stage, and `minicpmo serve`, which runs the whole stack locally (redis-server + Ray + the app)."""
