"""The stage runtime: what every Ray Serve stage of the pipeline shares (replica helpers, metrics, affinity
routing, session ownership in Redis, the error taxonomy). Stages import it; it imports no stage."""
