"""Pure Python core: index access, manifests, layout, s5cmd runner, verification.

Nothing in this package imports Dagster, so the CLI and tests use it directly.
"""
