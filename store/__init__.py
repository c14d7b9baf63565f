"""What lies in the data directory: the SQLite database and the files beside it (pictures,
adapters). The lowest layer: it imports no other package of ours (`memory`, `finetune` and
`serve` build on it; `pyproject.toml`'s import contracts check this in CI)."""
