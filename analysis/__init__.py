"""Turn finished sweep trials into the paper's tables and figures (docs/architecture.md#layers)."""
