"""Turn finished sweep trials into the paper's tables and figures (DESIGN.md, "analysis/")."""
