"""The paper's ablations as commands: ``run.py`` (one run), ``sweep.py`` (a table's grid),
``tables.py`` (table definitions and rendering), ``store.py`` (resumable results)."""
