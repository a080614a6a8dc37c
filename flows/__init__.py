"""Orchestration: the command line, run workspaces and (later) Prefect flows around the DVC stages."""
